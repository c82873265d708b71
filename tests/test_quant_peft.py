"""lorakit against PEFT 0.21 (the issue's peer) on the same quantized layers.

PEFT has LoRA layers of its own for torchao (``TorchaoLoraLinear``) and bitsandbytes (``lora.bnb.Linear8bitLt`` /
``Linear4bit``); diffusers' ``GGUFLinear`` and optimum-quanto's ``QLinear`` subclass ``nn.Linear``, so PEFT wraps them
in its plain ``lora.Linear``. For each, with the same A/B/alpha on an identically quantized copy:

* hook mode == PEFT's forward (both compute ``base(x) + B(A x)·alpha/r`` on the untouched quantized layer; measured
  max abs difference 0.0 on every row, asserted to 1e-6), and the LoRA changed the output;
* fuse mode == PEFT's ``merge()`` bit for bit where PEFT can merge (bnb int8/nf4, torchao int8/fp8: same
  dequantize-add-requantize), while ``remove()`` is bit-exact and PEFT's ``unmerge()`` is not (it requantizes again);
* where PEFT refuses or breaks, the test pins that behaviour by name: torchao merge without the requantization
  config (ValueError), GGUF merge (packed shape, RuntimeError), quanto merge (silently drops the LoRA), ComfyUI fp8
  scaled (factors made in float8, forward raises).

Each library is optional: its rows are skipped when it (or PEFT) is not installed.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import lorakit
from test_quant import ALPHA, BY_NAME, RANK, Scheme, _bits_equal, _has, _lora, _model, _rel, _x

pytestmark = pytest.mark.skipif(not _has("peft"), reason="peft not installed")

TOL = 1e-6  # hook vs PEFT forward: the same ops; measured difference 0.0

# scheme -> the PEFT layer class that wraps it
PEFT_LAYERS = {
    "torchao-int8wo": "TorchaoLoraLinear",
    "torchao-int8dq": "TorchaoLoraLinear",
    "torchao-fp8wo": "TorchaoLoraLinear",
    "bnb-int8": "Linear8bitLt",
    "bnb-nf4": "Linear4bit",
    "quanto-qint8": "Linear",
    "quanto-qint8-a8": "Linear",
    "quanto-qint4": "Linear",
    "gguf-Q8_0": "Linear",
    "gguf-Q4_0": "Linear",
}
MERGEABLE = ["bnb-int8", "bnb-nf4", "torchao-int8wo", "torchao-int8dq", "torchao-fp8wo"]


def _scheme(name: str) -> Scheme:
    s = BY_NAME[name]
    if not _has(s.needs):
        pytest.skip(f"{s.needs} not installed (pip install 'lorakit[quant]')")
    return s


def _torchao_config(name: str) -> object:
    import torchao.quantization as tq

    return {"torchao-int8wo": tq.Int8WeightOnlyConfig, "torchao-int8dq": tq.Int8DynamicActivationInt8WeightConfig,
            "torchao-fp8wo": tq.Float8WeightOnlyConfig}[name]()


def _peft_model(s: Scheme, merge_config: bool = False) -> torch.nn.Module:
    """The quantized MLP with PEFT's LoRA on fc1/fc2, A/B/alpha those of ``_lora()``. The flags transformers sets
    on a model it quantized are set by hand: ``is_loaded_in_8bit/4bit`` (PEFT's bnb dispatch) and, with
    ``merge_config``, ``hf_quantizer.quantization_config.get_apply_tensor_subclass`` (torchao's requantization)."""
    from peft import LoraConfig, inject_adapter_in_model

    m = _model(s)
    m.is_loaded_in_8bit = s.name == "bnb-int8"
    m.is_loaded_in_4bit = s.name == "bnb-nf4"
    if merge_config:
        config = types.SimpleNamespace(get_apply_tensor_subclass=lambda: _torchao_config(s.name))
        m.hf_quantizer = types.SimpleNamespace(quantization_config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchaoLoraLinear without get_apply_tensor_subclass: a warning
        m = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["fc1", "fc2"],
                                               init_lora_weights=False), m)
    lora = _lora()
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            w = lora.layers[n].weight
            getattr(m, n).lora_A["default"].weight.copy_(w.down)
            getattr(m, n).lora_B["default"].weight.copy_(w.up)
    return m


@pytest.mark.parametrize("name", list(PEFT_LAYERS))
def test_hook_mode_equals_peft_lora_on_the_same_quantized_layer(name: str) -> None:
    s = _scheme(name)
    peft_m, ours, x = _peft_model(s), _model(s), _x()
    assert type(peft_m.fc1).__name__ == PEFT_LAYERS[name]
    assert type(peft_m.fc1.get_base_layer()) is type(ours.fc1)
    base = ours(x)
    with torch.no_grad():
        y_peft = peft_m(x)
    with lorakit.apply(ours, _lora(), mode="hook") as patch:
        assert patch.report.quant["generic:fc1"]["library"] == s.library
        y = ours(x)
    torch.testing.assert_close(y, y_peft, rtol=TOL, atol=TOL)
    assert _rel(y, base) > 0.05, "the LoRA changed nothing (vacuous)"


@pytest.mark.parametrize("name", MERGEABLE)
def test_fuse_equals_peft_merge_bit_for_bit_and_only_remove_is_exact(name: str) -> None:
    s = _scheme(name)
    peft_m, ours, x = _peft_model(s, merge_config=True), _model(s), _x()
    raw0 = {n: {k: v.clone() for k, v in s.raw(getattr(ours, n)).items()} for n in ("fc1", "fc2")}
    with torch.no_grad():
        y_lora = peft_m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merge lora module to 8-bit linear may get different generations"
        for n in ("fc1", "fc2"):
            getattr(peft_m, n).merge()
        patch = lorakit.apply(ours, _lora(), mode="fuse")
    for n in ("fc1", "fc2"):
        theirs = s.raw(getattr(peft_m, n).get_base_layer())
        assert _bits_equal(s.raw(getattr(ours, n)), theirs), f"{n}: lorakit fuse != PEFT merge"
        assert not _bits_equal(raw0[n], theirs), "merge changed nothing (vacuous)"
    with torch.no_grad():
        merged = peft_m(x)
    torch.testing.assert_close(ours(x), merged, rtol=0, atol=0)
    assert _rel(merged, y_lora) < 0.2  # the merge keeps the LoRA up to requantization
    patch.remove()
    assert all(_bits_equal(raw0[n], s.raw(getattr(ours, n))) for n in ("fc1", "fc2")), "remove() not bit-exact"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in ("fc1", "fc2"):
            getattr(peft_m, n).unmerge()
    # PEFT's unmerge dequantizes, subtracts and requantizes again: not the original storage
    assert not _bits_equal(raw0["fc1"], s.raw(peft_m.fc1.get_base_layer()))


def test_peft_torchao_merge_needs_the_requantization_config() -> None:
    """A model quantized by hand with ``quantize_`` (no transformers ``TorchAoConfig``): PEFT 0.21 wraps it (with a
    warning) but cannot merge; lorakit's fuse requantizes with the layer's own scheme."""
    s = _scheme("torchao-int8wo")
    peft_m = _peft_model(s)
    with pytest.raises(ValueError, match="get_apply_tensor_subclass"):
        peft_m.fc1.merge()
    with lorakit.apply(_model(s), _lora(), mode="fuse") as patch:
        assert patch.report.quant["generic:fc1"]["requant_error"] < 0.2


def test_peft_merge_on_gguf_fails_on_the_packed_shape() -> None:
    """PEFT's plain lora.Linear adds ΔW to GGUF's packed uint8 blocks (diffusers #12047); lorakit fuse repacks."""
    s = _scheme("gguf-Q8_0")
    peft_m = _peft_model(s)
    with pytest.raises(RuntimeError, match="size of tensor"):
        peft_m.fc1.merge()
    with lorakit.apply(_model(s), _lora(), mode="fuse") as patch:
        assert patch.report.quant["generic:fc1"]["requant_error"] < 0.2


@pytest.mark.parametrize("name", ["quanto-qint8", "quanto-qint4"])
def test_peft_merge_on_quanto_silently_drops_the_lora(name: str) -> None:
    """PEFT's plain lora.Linear adds ΔW to ``weight.data`` of a quanto QTensor: no error, no effect (peft #1997:
    merging "won't work properly"). The merged model's output is the base output, bit for bit; lorakit's fuse keeps
    the LoRA (up to the requantization error)."""
    s = _scheme(name)
    peft_m, ours, x = _peft_model(s), _model(s), _x()
    base = ours(x)
    with torch.no_grad():
        y_lora = peft_m(x)
        for n in ("fc1", "fc2"):
            getattr(peft_m, n).merge()
        merged = peft_m(x)
    assert torch.equal(merged, base) and _rel(y_lora, base) > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qint4: the requantization warning
        with lorakit.apply(ours, _lora(), mode="fuse"):
            fused = ours(x)
    assert _rel(fused - base, y_lora - base) < 0.9  # qint4 keeps little of it, but not nothing; qint8 most of it
    assert _rel(fused, base) > 0.01


def test_peft_breaks_on_comfyui_fp8_scaled() -> None:
    """PEFT has no fp8-scaled layer: its plain lora.Linear makes the factors in the base weight's dtype (float8)
    and the forward raises. lorakit's hook runs the branch in the activation dtype."""
    s = _scheme("fp8-scaled-row")
    peft_m, ours, x = _peft_model(s), _model(s), _x()
    assert peft_m.fc1.lora_A["default"].weight.dtype == torch.float8_e4m3fn
    with pytest.raises(NotImplementedError, match="Float8_e4m3fn"), torch.no_grad():
        peft_m(x)
    base = ours(x)
    with lorakit.apply(ours, _lora(), mode="hook"):
        assert _rel(ours(x), base) > 0.05
