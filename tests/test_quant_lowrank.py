"""SVDQuant-style low-rank-branch layers (``lorakit quantize --lowrank``) and the branch route for LoRAs:

* ``W ≈ L·R + Q(W − L·R)`` is closer to W than per-row quantization alone (int8, fp8) on a weight with a
  decaying spectrum, and the file written by the CLI loads back into a float model;
* ``apply_branch``: the output equals the quantized base plus the LoRA computed by hand, the branch rank grows by
  each LoRA's rank (composition = concatenation), the quantized residual is never touched, ``remove()`` restores
  the old ranks and tensors bit for bit; adapters without exact factors and models without a branch are refused;
* hook and fuse mode of ``lorakit.apply`` also recognise the layer.
Only torch is needed (plain kernels).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters import LoHaWeights, LoRAWeights
from lorakit.errors import UnsupportedAdapterError
from lorakit.model import Layer, LoRA
from lorakit.quant import LowRankQuantLinear, apply_branch, load_lowrank, lowrank_state_dict, quantize_model

IN, HID, OUT, BRANCH = 96, 80, 64, 16


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _float_model() -> MLP:
    """Weights with a decaying spectrum plus noise, as trained weights have (outliers live in few directions)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the biases
    m = MLP().requires_grad_(False)
    for lin in (m.fc1, m.fc2):
        o, i = lin.weight.shape
        u, _ = torch.linalg.qr(torch.randn(o, o, generator=g))
        v, _ = torch.linalg.qr(torch.randn(i, i, generator=g))
        k = min(o, i)
        s = 2.0 * torch.exp(-torch.arange(k) / 6.0) + 0.02
        lin.weight.data = (u[:, :k] * s) @ v[:, :k].T + 0.005 * torch.randn(o, i, generator=g)
    return m


def _quantized(scheme: str = "int8", dtype: torch.dtype = torch.float32) -> tuple[MLP, dict]:
    m = _float_model()
    errors = quantize_model(m, scheme, BRANCH, branch_dtype=dtype)
    return m, errors


def _lora(seed: int, rank: int = 4) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({
        "fc1": Layer("fc1", None, "fc1", weight=LoRAWeights(0.2 * torch.randn(rank, IN, generator=g),
                                                            0.2 * torch.randn(HID, rank, generator=g), alpha=2.0)),
        "fc2": Layer("fc2", None, "fc2", weight=LoRAWeights(0.2 * torch.randn(rank, HID, generator=g),
                                                            0.2 * torch.randn(OUT, rank, generator=g), alpha=2.0)),
    })


def _branch(lora: LoRA, name: str, x: torch.Tensor) -> torch.Tensor:
    w = lora.layers[name].weight
    return (x @ w.down.T) @ w.up.T * (w.alpha / w.down.shape[0])


def _hand(m: MLP, loras: list[tuple[LoRA, float]], x: torch.Tensor) -> torch.Tensor:
    h = m.fc1(x) + sum(s * _branch(lo, "fc1", x) for lo, s in loras)
    a = torch.relu(h)
    return m.fc2(a) + sum(s * _branch(lo, "fc2", a) for lo, s in loras)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _bits_equal(a: dict[str, torch.Tensor], m: nn.Module) -> bool:
    b = m.state_dict()
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


X = torch.randn(6, IN, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_branch_makes_the_quantized_weight_closer(scheme: str) -> None:
    ref = _float_model()
    m, errors = _quantized(scheme, torch.bfloat16)
    assert set(errors) == {"fc1", "fc2"} and isinstance(m.fc1, LowRankQuantLinear) and m.fc1.rank == BRANCH
    for e in errors.values():
        assert e["error"] < 0.5 * e["error_no_branch"], e
    y_ref = ref(X)
    out_err = float((m(X) - y_ref).norm() / y_ref.norm())
    assert out_err < 0.05
    # bf16 activations: the branch runs in the activation dtype
    assert m(X.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_apply_branch_is_exact_composes_and_removes_bit_exact(scheme: str) -> None:
    m, _ = _quantized(scheme)
    before, base = _snapshot(m), m(X)
    a, b = _lora(1), _lora(2, rank=3)
    ref = _hand(m, [(a, 0.7), (b, -1.3)], X)
    residual = (m.fc1.weight.clone(), m.fc1.weight_scale.clone())
    patch = apply_branch(m, [(a, 0.7), (b, -1.3)])
    assert m.fc1.rank == BRANCH + 4 + 3 and m.fc2.rank == BRANCH + 7
    assert patch.report["quant"]["generic:fc1"] == {"library": "lorakit", "old_rank": BRANCH, "new_rank": BRANCH + 7}
    assert torch.equal(m.fc1.weight, residual[0]) and torch.equal(m.fc1.weight_scale, residual[1]), "requantized"
    y = m(X)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert float((y - base).norm() / base.norm()) > 0.05, "the LoRAs changed nothing (vacuous)"
    # a second patch stacks on the first, and each removal restores the ranks before it
    second = apply_branch(m, (a, 0.5))
    assert m.fc1.rank == BRANCH + 11
    second.remove()
    assert m.fc1.rank == BRANCH + 7
    torch.testing.assert_close(m(X), ref, rtol=1e-5, atol=1e-5)
    patch.remove()
    assert m.fc1.rank == BRANCH and _bits_equal(before, m)
    assert torch.equal(m(X), base)


def test_branch_equals_hook_mode_and_fuse_mode_also_works() -> None:
    m, _ = _quantized("int8")
    before, base = _snapshot(m), m(X)
    lora = _lora(3)
    with lorakit.apply(m, [(lora, 0.9)], mode="hook") as hook:
        assert hook.report.quant["generic:fc1"]["library"] == "lorakit"
        hooked = m(X)
    assert _bits_equal(before, m)
    with apply_branch(m, [(lora, 0.9)]):
        branched = m(X)
    torch.testing.assert_close(branched, hooked, rtol=1e-5, atol=1e-5)
    with lorakit.apply(m, [(lora, 0.9)], mode="fuse") as fused:
        err = fused.report.quant["generic:fc1"]["requant_error"]
        assert 0 < err < 0.1 and m.fc1.rank == BRANCH  # fuse requantizes the residual, keeps the branch
        torch.testing.assert_close(m(X), hooked, rtol=0.02, atol=0.02)
    assert _bits_equal(before, m) and torch.equal(m(X), base)
    assert float((hooked - base).norm() / base.norm()) > 0.05


def test_branch_refuses_what_it_cannot_do_and_changes_nothing() -> None:
    m, _ = _quantized("int8")
    before = _snapshot(m)
    loha = LoRA({"fc1": Layer("fc1", None, "fc1", weight=LoHaWeights(
        torch.randn(HID, 2), torch.randn(2, IN), torch.randn(HID, 2), torch.randn(2, IN), alpha=2.0))})
    with pytest.raises(UnsupportedAdapterError, match="mode='hook'"):
        apply_branch(m, [(_lora(1), 1.0), (loha, 1.0)])
    assert _bits_equal(before, m)
    plain = _float_model()
    with pytest.raises(UnsupportedAdapterError, match="lorakit quantize --lowrank"):
        apply_branch(plain, _lora(1))


def test_state_dict_and_cli_roundtrip(tmp_path) -> None:
    from lorakit.cli import cli

    ref = _float_model()
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
    out = tmp_path / "model-int8-r16.safetensors"
    res = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--scheme", "int8", "--lowrank", "16"])
    assert res.exit_code == 0, res.output
    assert "2 layers int8 + rank-16 branch" in res.output
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    m = load_lowrank(MLP(), load_file(str(out)), metadata)
    assert isinstance(m.fc2, LowRankQuantLinear) and m.fc2.weight.dtype == torch.int8
    assert m.fc2.lowrank_up.dtype == torch.bfloat16 and m.fc2.rank == 16
    same, _ = _quantized("int8", torch.bfloat16)
    assert _bits_equal(_snapshot(m), same), "file route and in-memory route differ"
    # (outputs agree to float rounding only: the file's tensors sit at other alignments, so BLAS may sum differently)
    torch.testing.assert_close(m(X), same(X), rtol=1e-5, atol=1e-6)
    state, meta = lowrank_state_dict(same)
    assert _bits_equal(state, load_lowrank(MLP(), state, meta))
    with apply_branch(m, _lora(1)):
        assert not torch.equal(m(X), same(X))
