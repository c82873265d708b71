"""LoRAs on quantized bases, case table: one row per quantization scheme that runs on this CPU (torchao, optimum-quanto,
diffusers GGUF, bitsandbytes, fp8 + separate scale) crossed with

* hook mode: output == quantized base output + LoRA delta computed by hand in the activation dtype, live strengths,
  ``remove()`` leaves the raw quantized storage (int data, scales) bit-identical;
* fuse mode: the fused layer equals dequantize + add + requantize done by hand with the library's own quantizer, the
  report's per-layer ``requant_error`` equals the reference's relative Frobenius error, ``remove()`` is bit-exact;
* a warning that names hook mode when the requantization loses most of the LoRA (default threshold 0.5).

Each library is optional (``pip install 'lorakit[quant]'``): its rows are skipped when it is not installed.
Every case also asserts that the LoRA really changed the output (non-vacuity).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA
from lorakit.quant import Fp8ScaledLinear

IN, HID, OUT = 64, 64, 32
RANK, ALPHA = 4, 8.0


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _has(mod: str) -> bool:
    """Whether ``mod`` is importable; a dotted name whose parent package is missing counts as absent."""
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:  # find_spec("optimum.quanto") without "optimum"
        return False


# -- per scheme: how to quantize a float Linear, read its raw storage, dequantize it and requantize by hand ------
@dataclass
class Scheme:
    name: str
    needs: str  # the module that must be importable
    quantize: Callable[[MLP], None]  # in place, both layers
    raw: Callable[[nn.Module], dict[str, torch.Tensor]]  # int data and scales, read independently of lorakit
    dequant: Callable[[nn.Module], torch.Tensor]  # logical weight, fp32
    requant: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # fp32 W -> dequant(Q(W)) with the layer's scheme
    library: str
    #: worst requant error (relative Frobenius of the applied delta) expected for the 10 % test delta
    max_error: float


def _torchao(config_name: str) -> Callable[[MLP], None]:
    def quantize(m: MLP) -> None:
        import torchao.quantization as tq

        tq.quantize_(m, getattr(tq, config_name)())

    return quantize


def _torchao_raw(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {"qdata": mod.weight.qdata, "scale": mod.weight.scale}


def _torchao_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    import torchao.quantization as tq

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    wrapper = nn.Sequential(lin)
    config = {"Int8Tensor": tq.Int8WeightOnlyConfig, "Float8Tensor": tq.Float8WeightOnlyConfig}[type(mod.weight).__name__]
    tq.quantize_(wrapper, config())
    return wrapper[0].weight.dequantize().float()


def _quanto(qtype: str, activations: str | None = None) -> Callable[[MLP], None]:
    def quantize(m: MLP) -> None:
        import optimum.quanto as oq

        oq.quantize(m, weights=getattr(oq, qtype), activations=activations and getattr(oq, activations))
        if activations:
            with oq.Calibration():
                m(_x(next(m.parameters()).dtype))
        oq.freeze(m)

    return quantize


def _quanto_raw(mod: nn.Module) -> dict[str, torch.Tensor]:
    w = mod.weight
    data = w._data
    data = data._data if type(data) is not torch.Tensor else data  # qint4: PackedTensor over uint8
    out = {"data": data, "scale": w._scale}
    if getattr(w, "_shift", None) is not None:
        out["shift"] = w._shift
    return out


def _quanto_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    import optimum.quanto as oq

    lin = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    lin[0].weight.data.copy_(w)
    oq.quantize(lin, weights=mod.weight.qtype)
    oq.freeze(lin)
    return lin[0].weight.dequantize().float()


def _gguf(qtype: str) -> Callable[[MLP], None]:
    def quantize(m: MLP) -> None:
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        qt = gguf.GGMLQuantizationType[qtype]
        for name in ("fc1", "fc2"):
            lin = getattr(m, name)
            q = GGUFLinear(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32)
            packed = gguf.quants.quantize(lin.weight.detach().numpy(), qt)
            q.weight = GGUFParameter(torch.from_numpy(packed), quant_type=qt)
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            setattr(m, name, q)

    return quantize


def _gguf_raw(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {"blocks": mod.weight.as_tensor().view(torch.uint8)}


def _gguf_dequant(mod: nn.Module) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(mod.weight).float()


def _gguf_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    qt = mod.weight.quant_type
    packed = gguf.quants.quantize(w.numpy(), qt)
    # dequantized the way GGUFLinear's forward does (diffusers: fp16 block scales times the ints, in fp16)
    return dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(packed), quant_type=qt)).float()


def _bnb8(m: MLP) -> None:
    import bitsandbytes as bnb

    for name in ("fc1", "fc2"):
        lin = getattr(m, name)
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(m, name, q.to("cpu"))  # .to() quantizes


def _bnb8_scb(mod: nn.Module) -> torch.Tensor:
    scb = getattr(mod.weight, "SCB", None)
    return scb if scb is not None else mod.state.SCB


def _bnb8_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    # LLM.int8 vector-wise absmax: int8 = round(127 · w / absmax(row)), held in fp16 precision
    w16 = w.half().float()
    scb = w16.abs().amax(dim=1)
    q = torch.round(w16 * (127.0 / scb[:, None])).clamp(-127, 127)
    return q * (scb.half().float()[:, None] / 127.0)


def _bnb4(m: MLP) -> None:
    import bitsandbytes as bnb

    for name in ("fc1", "fc2"):
        lin = getattr(m, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, quant_type="nf4",
                              compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(m, name, q.to("cpu"))


def _bnb4_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes as bnb

    qs = mod.weight.quant_state
    data, state = bnb.functional.quantize_4bit(w.to(qs.dtype).contiguous(), blocksize=qs.blocksize,
                                               compress_statistics=qs.nested, quant_type=qs.quant_type)
    return bnb.functional.dequantize_4bit(data, state).float()


def _fp8(per_row: bool) -> Callable[[MLP], None]:
    def quantize(m: MLP) -> None:
        for name in ("fc1", "fc2"):
            setattr(m, name, Fp8ScaledLinear.from_linear(getattr(m, name), per_row=per_row))

    return quantize


def _fp8_scale(mod: nn.Module) -> torch.Tensor:
    s = mod.weight_scale.float()
    return s.reshape(-1, 1) if s.numel() > 1 else s


def _fp8_requant(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    # ComfyUI's fp8 patching: the scale is kept, W/scale rounded to nearest on the e4m3 grid (saturating)
    limit = torch.finfo(torch.float8_e4m3fn).max
    return (w / _fp8_scale(mod)).clamp(-limit, limit).to(torch.float8_e4m3fn).float() * _fp8_scale(mod)


def _deq(mod: nn.Module) -> torch.Tensor:
    return mod.weight.dequantize().float()


SCHEMES = [
    Scheme("torchao-int8wo", "torchao", _torchao("Int8WeightOnlyConfig"), _torchao_raw, _deq, _torchao_requant,
           "torchao", 0.2),
    Scheme("torchao-int8dq", "torchao", _torchao("Int8DynamicActivationInt8WeightConfig"), _torchao_raw, _deq,
           _torchao_requant, "torchao", 0.2),
    Scheme("torchao-fp8wo", "torchao", _torchao("Float8WeightOnlyConfig"), _torchao_raw, _deq, _torchao_requant,
           "torchao", 0.6),
    Scheme("quanto-qint8", "optimum.quanto", _quanto("qint8"), _quanto_raw, _deq, _quanto_requant, "quanto", 0.2),
    Scheme("quanto-qint8-a8", "optimum.quanto", _quanto("qint8", "qint8"), _quanto_raw, _deq, _quanto_requant,
           "quanto", 0.2),
    Scheme("quanto-qfloat8", "optimum.quanto", _quanto("qfloat8"), _quanto_raw, _deq, _quanto_requant, "quanto", 0.6),
    Scheme("quanto-qint4", "optimum.quanto", _quanto("qint4"), _quanto_raw, _deq, _quanto_requant, "quanto", 1.5),
    Scheme("gguf-Q8_0", "gguf", _gguf("Q8_0"), _gguf_raw, _gguf_dequant, _gguf_requant, "gguf", 0.2),
    Scheme("gguf-Q4_0", "gguf", _gguf("Q4_0"), _gguf_raw, _gguf_dequant, _gguf_requant, "gguf", 1.5),
    Scheme("bnb-int8", "bitsandbytes", _bnb8, lambda m: {"CB": m.weight.data, "SCB": _bnb8_scb(m)},
           lambda m: m.weight.data.float() * (_bnb8_scb(m).float()[:, None] / 127.0), _bnb8_requant,
           "bitsandbytes", 0.2),
    Scheme("bnb-nf4", "bitsandbytes", _bnb4,
           lambda m: {"data": m.weight.data, "absmax": m.weight.quant_state.absmax},
           lambda m: __import__("bitsandbytes").functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float(),
           _bnb4_requant, "bitsandbytes", 1.5),
    Scheme("fp8-scaled-tensor", "torch", _fp8(False), lambda m: {"w": m.weight.view(torch.uint8), "s": m.weight_scale},
           lambda m: m.weight.float() * _fp8_scale(m), _fp8_requant, "fp8", 0.6),
    Scheme("fp8-scaled-row", "torch", _fp8(True), lambda m: {"w": m.weight.view(torch.uint8), "s": m.weight_scale},
           lambda m: m.weight.float() * _fp8_scale(m), _fp8_requant, "fp8", 0.6),
]
BY_NAME = {s.name: s for s in SCHEMES}


def _scheme(name: str) -> Scheme:
    s = BY_NAME[name]
    if not _has(s.needs):
        pytest.skip(f"{s.needs} not installed (pip install 'lorakit[quant]')")
    return s


# -- model, LoRA, references -----------------------------------------------------------------------------------
def _model(s: Scheme, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(0)
    m = MLP().requires_grad_(False).to(dtype)
    s.quantize(m)
    m.requires_grad_(False)
    return m


def _lora(rel: float = 0.1) -> LoRA:
    """A rank-4 LoRA on both layers whose delta at strength 1 has ‖ΔW‖ ≈ rel · ‖W‖ (W: nn.Linear's init)."""
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, (i, o) in {"fc1": (IN, HID), "fc2": (HID, OUT)}.items():
        down, up = torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g)
        w_norm = (o * i / 3) ** 0.5 / i ** 0.5  # ‖W‖ of U(-1/√i, 1/√i)
        k = rel * w_norm / float((up @ down).norm() * ALPHA / RANK)
        layers[name] = Layer(name, None, name, weight=LoRAWeights(down * k ** 0.5, up * k ** 0.5, alpha=ALPHA))
    return LoRA(layers)


def _delta(lora: LoRA, name: str) -> torch.Tensor:
    w = lora.layers[name].weight
    return (w.up.float() @ w.down.float()) * (ALPHA / RANK)


def _branch(lora: LoRA, name: str, x: torch.Tensor) -> torch.Tensor:
    w = lora.layers[name].weight
    return (x @ w.down.to(x.dtype).T) @ w.up.to(x.dtype).T * (ALPHA / RANK)


def _hooked_ref(m: MLP, lora: LoRA, s: float, x: torch.Tensor) -> torch.Tensor:
    """By hand: each quantized layer's own forward, plus s · B(A x) in the activation dtype."""
    h = m.fc1(x) + s * _branch(lora, "fc1", x)
    a = torch.relu(h)
    return m.fc2(a) + s * _branch(lora, "fc2", a)


def _raw(s: Scheme, m: MLP) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n in ("fc1", "fc2") for k, v in s.raw(getattr(m, n)).items()}


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(2)).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm())


NAMES = [s.name for s in SCHEMES]


# -- hook mode -------------------------------------------------------------------------------------------------
# quanto with int8 activations quantizes the layer's input in its own pre-hook; the runtime keeps the float x for
# the branch (a pre-hook run first), as PEFT's wrapper does: every row, that one included, is exact.
@pytest.mark.parametrize("name", NAMES)
def test_hook_equals_quantized_base_plus_branch(name: str) -> None:
    s = _scheme(name)
    m, lora, x = _model(s), _lora(), _x()
    raw0, base = _raw(s, m), m(x)
    ref = _hooked_ref(m, lora, 0.8, x)
    patch = lorakit.apply(m, [(lora, 0.8)], mode="hook")
    assert set(patch.report.quant) == {"generic:fc1", "generic:fc2"}, patch.report.quant
    for q in patch.report.quant.values():
        assert q["library"] == s.library and q["shape"] in ([HID, IN], [OUT, HID]) and "requant_error" not in q
    assert _bits_equal(raw0, _raw(s, m)), "hook mode touched the quantized storage"
    y = m(x)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert _rel(y, base) > 0.02, "the LoRA changed nothing (vacuous)"

    patch.set_strengths([-0.5])  # live
    torch.testing.assert_close(m(x), _without_hooks(patch, lambda: _hooked_ref(m, lora, -0.5, x)), rtol=1e-5, atol=1e-5)
    patch.set_strengths([0.0])
    assert torch.equal(m(x), base)
    patch.remove()
    assert _bits_equal(raw0, _raw(s, m)), "remove() did not leave the storage bit-identical"
    assert torch.equal(m(x), base)


def _without_hooks(patch: lorakit.Patch, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` with the patch's hooks muted (strength 0 is the identity), then restore the strengths."""
    saved = patch.strengths
    patch.set_strengths([0.0] * len(saved))
    try:
        return fn()
    finally:
        patch.set_strengths(saved)


@pytest.mark.parametrize("name", ["torchao-int8wo", "fp8-scaled-row", "quanto-qint8"])
def test_hook_branch_runs_in_activation_dtype(name: str) -> None:
    s = _scheme(name)
    m = _model(s, torch.bfloat16)
    x = _x(torch.bfloat16)
    lora = _lora()
    base = m(x)
    ref = _hooked_ref(m, lora, 1.0, x)
    with lorakit.apply(m, lora, mode="hook"):
        y = m(x)
    assert y.dtype == torch.bfloat16
    # the same math in the same dtype; hook mode adds s·B(Ax) as one GEMM pair with s·α/r folded into B, so the
    # rounding differs from this reference's by bf16 steps only
    torch.testing.assert_close(y, ref, rtol=1.6e-2, atol=2e-2)
    assert _rel(y, base) > 0.02


# -- fuse mode -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fuse_equals_dequant_add_requant_and_remove_is_exact(name: str) -> None:
    s = _scheme(name)
    m, lora, x = _model(s), _lora(), _x()
    raw0, base = _raw(s, m), m(x)
    kinds = {n: (type(getattr(m, n).weight), getattr(getattr(m, n).weight, "activation_qtype", None)) for n in ("fc1", "fc2")}
    strength = 0.8
    refs, errors = {}, {}
    for n in ("fc1", "fc2"):
        mod = getattr(m, n)
        w0 = s.dequant(mod)
        d = strength * _delta(lora, n)
        refs[n] = s.requant(mod, w0 + d)
        errors[n] = float((refs[n] - w0 - d).detach().norm() / d.norm())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        patch = lorakit.apply(m, [(lora, strength)], mode="fuse")
    lossy = [w for w in rec if "requantizing lost" in str(w.message)]
    for n in ("fc1", "fc2"):
        q = patch.report.quant[f"generic:{n}"]
        assert q["library"] == s.library
        assert q["requant_error"] == pytest.approx(errors[n], rel=1e-4, abs=1e-6), n
        assert q["requant_error"] <= s.max_error, f"{n}: {q['requant_error']}"
        torch.testing.assert_close(s.dequant(getattr(m, n)), refs[n], rtol=0, atol=0)
        w = getattr(m, n).weight
        assert (type(w), getattr(w, "activation_qtype", None)) == kinds[n], "requantized into another tensor type"
    assert bool(lossy) == any(e > 0.5 for e in errors.values())
    assert not _bits_equal(raw0, _raw(s, m)), "fuse left the storage as it was (vacuous)"
    y = m(x)
    assert _rel(y, base) > 0.02
    patch.remove()
    assert _bits_equal(raw0, _raw(s, m)), "remove() after fuse is not bit-exact"
    assert torch.equal(m(x), base)


@pytest.mark.parametrize("name", ["torchao-int8wo", "fp8-scaled-tensor", "gguf-Q8_0"])
def test_fuse_warns_and_names_hook_mode_when_the_lora_is_lost(name: str) -> None:
    s = _scheme(name)
    m = _model(s)
    raw0 = _raw(s, m)
    with pytest.warns(UserWarning, match="mode='hook'") as rec:
        patch = lorakit.apply(m, _lora(rel=0.001), mode="fuse")
    assert any("fc1" in str(w.message) for w in rec)
    assert all(q["requant_error"] > 0.5 for q in patch.report.quant.values())
    patch.remove()
    assert _bits_equal(raw0, _raw(s, m))
    # the threshold is an option: raised above the error, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.apply(m, _lora(rel=0.001), mode="fuse", requant_warn=10.0).remove()
    assert _bits_equal(raw0, _raw(s, m))


def test_gguf_k_quant_hooks_and_fuse_refuses_naming_hook_mode() -> None:
    """The gguf package cannot quantize K-quants: hook mode works, fuse raises before changing anything."""
    s = _scheme("gguf-Q8_0")
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from lorakit.errors import UnsupportedAdapterError

    qt = gguf.GGMLQuantizationType.Q4_K
    block, size = gguf.GGML_QUANT_SIZES[qt]
    m = nn.Module()
    m.fc = GGUFLinear(block, 32, bias=False, compute_dtype=torch.float32)
    m.fc.weight = GGUFParameter(torch.zeros(32, size, dtype=torch.uint8), quant_type=qt)  # all-zero blocks: W = 0
    g = torch.Generator().manual_seed(0)
    lora = LoRA({"fc": Layer("fc", None, "fc", weight=LoRAWeights(torch.randn(RANK, block, generator=g),
                                                                   torch.randn(32, RANK, generator=g), alpha=ALPHA))})
    x = torch.randn(3, block, generator=g)
    raw0 = s.raw(m.fc)["blocks"].clone()
    with lorakit.apply(m, lora, mode="hook") as patch:
        assert patch.report.quant["generic:fc"]["scheme"] == "GGUFParameter Q4_K"
        torch.testing.assert_close(m.fc(x), _branch(lora, "fc", x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedAdapterError, match="mode='hook'"):
        lorakit.apply(m, lora, mode="fuse")
    assert torch.equal(s.raw(m.fc)["blocks"], raw0)


@pytest.mark.parametrize("name", ["torchao-int8wo", "fp8-scaled-row"])
@pytest.mark.parametrize("adapter", ["lokr", "dora"])
def test_other_adapters_on_a_quantized_base(name: str, adapter: str) -> None:
    """LoKr (dense delta) and DoRA (needs the dequantized base): hook == fuse up to the requantization error."""
    from lorakit.adapters import DoRA, LoKrWeights

    s = _scheme(name)
    m, x = _model(s), _x()
    raw0, base = _raw(s, m), m(x)
    g = torch.Generator().manual_seed(4)
    if adapter == "lokr":
        layer = Layer("fc1", None, "fc1", weight=LoKrWeights(lokr_w1=0.3 * torch.randn(8, 8, generator=g),
                                                             lokr_w2=0.05 * torch.randn(8, 8, generator=g)))
    else:
        layer = Layer("fc1", None, "fc1", weight=LoRAWeights(0.1 * torch.randn(RANK, IN, generator=g),
                                                             0.1 * torch.randn(HID, RANK, generator=g)),
                      dora=DoRA(torch.rand(HID, 1, generator=g) + 0.5, "out"))
    lora = LoRA({"fc1": layer})
    with lorakit.apply(m, lora, mode="hook"):
        hooked = m(x)
    assert _bits_equal(raw0, _raw(s, m))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lorakit.apply(m, lora, mode="fuse") as patch:
            fused = m(x)
            err = patch.report.quant["generic:fc1"]["requant_error"]
    assert _bits_equal(raw0, _raw(s, m))
    assert _rel(hooked, base) > 0.05, "the adapter changed nothing (vacuous)"
    # the fused output differs from the hooked one by the requantization error of the delta, nothing more
    assert _rel(fused - base, hooked - base) < 2 * err + 1e-3
