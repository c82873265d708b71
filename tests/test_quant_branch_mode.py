"""``lorakit.apply(..., mode="branch")`` on a low-rank-branch model (``lorakit quantize --lowrank``):

* exact: the output equals the dense reference ``x·(deq(W) + Σ sᵢ·scaleᵢ·BᵢAᵢ)ᵀ`` (fp32 branch), and the quantized
  residual is never touched (no requantization);
* stacking is concatenation (Nunchaku's ``compose_lora``): the branch after one apply of two LoRAs is bit for bit the
  old branch with each LoRA's strength-folded factors appended, and equals two applies one after the other;
* ``remove()`` puts the very original tensors back: old ranks, bit-exact storage and output;
* a failed apply (adapter without exact factors, a layer without a branch) leaves the model untouched; layers without
  a branch are refused naming the layer and hook mode, or skipped with ``strict=False``;
* ``set_strengths`` rebuilds the appended factors; the patch sits on the runtime's stack and interleaves with hook and
  fuse patches on other layers (and fuse on the same layer).
Only torch is needed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.adapters import LoHaWeights, LoRAWeights
from lorakit.errors import PatchOrderError, UnsupportedAdapterError
from lorakit.model import Layer, LoRA
from lorakit.quant import LowRankQuantLinear, quantize_model

IN, HID, OUT, HEAD, BRANCH = 96, 80, 64, 8, 16


class Net(nn.Module):
    """Two layers that get a branch, and a head too narrow for one (its smaller side is below the rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)
        self.head = nn.Linear(OUT, HEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model(scheme: str = "int8", dtype: torch.dtype = torch.float32) -> Net:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = Net().requires_grad_(False)
    for lin in (m.fc1, m.fc2):
        o, i = lin.weight.shape
        u, _ = torch.linalg.qr(torch.randn(o, o, generator=g))
        v, _ = torch.linalg.qr(torch.randn(i, i, generator=g))
        k = min(o, i)
        s = 2.0 * torch.exp(-torch.arange(k) / 6.0) + 0.02
        lin.weight.data = (u[:, :k] * s) @ v[:, :k].T + 0.005 * torch.randn(o, i, generator=g)
    assert set(quantize_model(m, scheme, BRANCH, branch_dtype=dtype)) == {"fc1", "fc2"}
    assert type(m.head) is nn.Linear
    return m


def _lw(seed: int, i: int, o: int, rank: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights(0.2 * torch.randn(rank, i, generator=g), 0.2 * torch.randn(o, rank, generator=g), alpha=2.0)


def _lora(seed: int, rank: int = 4, head: bool = False, body: bool = True) -> LoRA:
    layers = {}
    if body:
        layers["fc1"] = Layer("fc1", None, "fc1", weight=_lw(seed, IN, HID, rank))
        layers["fc2"] = Layer("fc2", None, "fc2", weight=_lw(seed + 100, HID, OUT, rank))
    if head:
        layers["head"] = Layer("head", None, "head", weight=_lw(seed + 200, OUT, HEAD, rank))
    return LoRA(layers)


def _weights(m: Net) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's logical weight (fp32) and bias, taken before any patch."""
    return {name: ((mod.dequantize() if isinstance(mod, LowRankQuantLinear) else mod.weight.float()).clone(),
                   mod.bias.clone())
            for name in ("fc1", "fc2", "head") for mod in [getattr(m, name)]}


def _dense(w0: dict, loras: list[tuple[LoRA, float]], x: torch.Tensor) -> torch.Tensor:
    """The dense reference: every layer's logical weight plus Σ s·scale·B·A, in fp32."""
    h = x
    for name in ("fc1", "fc2", "head"):
        w, bias = w0[name]
        for lora, s in loras:
            layer = lora.layers.get(name)
            if layer is not None:
                lw = layer.weight
                w = w + s * (lw.alpha / lw.down.shape[0]) * (lw.up.float() @ lw.down.float())
        h = F.linear(h, w, bias)
        if name != "head":
            h = torch.relu(h)
    return h


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _bits_equal(a: dict[str, torch.Tensor], m: nn.Module) -> bool:
    b = m.state_dict()
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


X = torch.randn(6, IN, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_branch_mode_is_exact_against_the_dense_weight(scheme: str) -> None:
    m = _model(scheme)
    before, base, w0 = _snapshot(m), m(X), _weights(m)
    residual = {n: (getattr(m, n).weight, getattr(m, n).weight_scale) for n in ("fc1", "fc2")}
    a, b = _lora(1), _lora(2, rank=3)
    ref = _dense(w0, [(a, 0.7), (b, -1.3)], X)
    patch = lorakit.apply(m, [(a, 0.7), (b, -1.3)], mode="branch")
    assert patch.mode == "branch" and patch.report.mode == "branch"
    assert m.fc1.rank == BRANCH + 7 and m.fc2.rank == BRANCH + 7
    q = patch.report.quant["generic:fc1"]
    assert q["library"] == "lorakit" and (q["old_rank"], q["new_rank"]) == (BRANCH, BRANCH + 7)
    assert patch.report.touched_tensors == 4
    for n, (w, s) in residual.items():
        assert getattr(m, n).weight is w and getattr(m, n).weight_scale is s, f"{n}: the residual was requantized"
    y = m(X)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert _rel(y, base) > 0.05, "the LoRAs changed nothing (vacuous)"
    patch.remove()
    assert m.fc1.rank == BRANCH and _bits_equal(before, m) and torch.equal(m(X), base)


def test_bf16_branch_rounds_the_appended_factors_only() -> None:
    """The branch keeps its dtype: the strength-folded factors are rounded to bf16 once (as Nunchaku's 16-bit
    branch does); the output stays within bf16 rounding of the dense reference."""
    m = _model("int8", torch.bfloat16)
    base, w0 = m(X), _weights(m)
    lora = _lora(3)
    ref = _dense(w0, [(lora, 0.9)], X)
    with lorakit.apply(m, (lora, 0.9), mode="branch"):
        assert m.fc1.lowrank_up.dtype == torch.bfloat16
        y = m(X)
    assert _rel(y, ref) < 1e-2 and _rel(y, base) > 0.05
    assert torch.equal(m(X), base)


def test_stacking_is_concatenation() -> None:
    m = _model()
    up0, down0 = m.fc1.lowrank_up, m.fc1.lowrank_down
    a, b = _lora(1), _lora(2, rank=3)
    with lorakit.apply(m, [(a, 0.7), (b, -1.3)], mode="branch"):
        one_up, one_down = m.fc1.lowrank_up.clone(), m.fc1.lowrank_down.clone()
        one_y = m(X)
    wa, wb = a.layers["fc1"].weight, b.layers["fc1"].weight
    assert torch.equal(one_up, torch.cat([up0, wa.up * (0.7 * wa.alpha / 4), wb.up * (-1.3 * wb.alpha / 3)], 1))
    assert torch.equal(one_down, torch.cat([down0, wa.down, wb.down], 0))
    # two patches, one after the other: the same branch (composition = concatenation)
    first = lorakit.apply(m, (a, 0.7), mode="branch")
    second = lorakit.apply(m, (b, -1.3), mode="branch")
    assert torch.equal(m.fc1.lowrank_up, one_up) and torch.equal(m.fc1.lowrank_down, one_down)
    torch.testing.assert_close(m(X), one_y, rtol=0, atol=0)
    with pytest.raises(PatchOrderError):
        first.remove()
    second.remove()
    assert m.fc1.rank == BRANCH + 4
    first.remove()
    assert m.fc1.lowrank_up is up0 and m.fc1.lowrank_down is down0, "not the very original tensors"


def test_set_strengths_rebuilds_the_appended_factors() -> None:
    m = _model()
    before, base, w0 = _snapshot(m), m(X), _weights(m)
    a, b = _lora(1), _lora(2, rank=3)
    patch = lorakit.apply(m, [(a, 0.7), (b, -1.3)], mode="branch")
    patch.set_strengths([0.2, 0.5])
    assert patch.strengths == [0.2, 0.5]
    torch.testing.assert_close(m(X), _dense(w0, [(a, 0.2), (b, 0.5)], X), rtol=1e-5, atol=1e-5)
    patch.set_strengths([0.0, 0.5])  # strength 0 drops that LoRA's factors
    assert m.fc1.rank == BRANCH + 3
    patch.set_strengths([0.0, 0.0])
    assert m.fc1.rank == BRANCH and torch.equal(m(X), base)
    patch.set_strengths([1.0, 1.0])
    assert patch.report.quant["generic:fc1"]["new_rank"] == BRANCH + 7
    with pytest.raises(ValueError, match="expected 2 strengths"):
        patch.set_strengths([1.0])
    later = lorakit.apply(m, _lora(5), mode="branch")
    with pytest.raises(PatchOrderError, match="later patch"):
        patch.set_strengths([0.3, 0.3])
    assert patch.strengths == [1.0, 1.0]
    later.remove()
    patch.remove()
    assert _bits_equal(before, m) and torch.equal(m(X), base)
    with pytest.raises(PatchOrderError, match="removed"):
        patch.set_strengths([1.0, 1.0])


def test_a_failed_set_strengths_changes_nothing() -> None:
    """A LoHa at strength 0 is nothing to append; asking for a non-zero strength is refused, the branch kept."""
    m = _model()
    loha = LoRA({"fc1": Layer("fc1", None, "fc1", weight=LoHaWeights(
        torch.randn(HID, 2), torch.randn(2, IN), torch.randn(HID, 2), torch.randn(2, IN), alpha=2.0))})
    patch = lorakit.apply(m, [(_lora(1), 0.7), (loha, 0.0)], mode="branch")
    up, y = m.fc1.lowrank_up, m(X)
    with pytest.raises(UnsupportedAdapterError, match="mode='hook'"):
        patch.set_strengths([0.7, 1.0])
    assert m.fc1.lowrank_up is up and torch.equal(m(X), y) and patch.strengths == [0.7, 0.0]
    patch.remove()
    assert m.fc1.rank == BRANCH


def test_failed_apply_leaves_the_model_untouched() -> None:
    m = _model()
    before = _snapshot(m)
    loha = LoRA({"fc2": Layer("fc2", None, "fc2", weight=LoHaWeights(
        torch.randn(OUT, 2), torch.randn(2, HID), torch.randn(OUT, 2), torch.randn(2, HID), alpha=2.0))})
    with pytest.raises(UnsupportedAdapterError, match="mode='hook'"):
        lorakit.apply(m, [(_lora(1), 1.0), (loha, 1.0)], mode="branch")
    assert _bits_equal(before, m) and m.fc1.rank == BRANCH
    # a layer without a branch: refused by default, naming the layer and hook mode
    with pytest.raises(UnsupportedAdapterError, match=r"head -> generic:head: a Linear, not a low-rank-branch.*mode='hook'"):
        lorakit.apply(m, _lora(1, head=True), mode="branch")
    with pytest.raises(UnsupportedAdapterError):
        lorakit.apply(m, _lora(1, head=True), mode="branch", strict=True)
    assert _bits_equal(before, m)
    with pytest.raises(ValueError, match="fuse, hook, branch"):
        lorakit.apply(m, _lora(1), mode="branches")
    # strict=False: such layers are skipped with a warning, the others go on the branch
    with pytest.warns(UserWarning, match="head"):
        patch = lorakit.apply(m, _lora(1, head=True), mode="branch", strict=False)
    assert "head" in patch.report.shape_mismatches["0:lora"] and m.fc1.rank == BRANCH + 4
    patch.remove()
    assert _bits_equal(before, m)


def test_interleaves_with_hook_and_fuse_patches() -> None:
    """hook on the plain head, branch on the low-rank layers, fuse on the head and fuse on a low-rank layer: each
    output is the dense reference of what is active; removal in reverse order is bit-exact."""
    m = _model()
    before, base, w0 = _snapshot(m), m(X), _weights(m)
    h, b, f = _lora(11, head=True, body=False), _lora(12), _lora(13, head=True, body=False)
    hook = lorakit.apply(m, (h, 0.6), mode="hook")
    branch = lorakit.apply(m, (b, 0.8), mode="branch")
    torch.testing.assert_close(m(X), _dense(w0, [(h, 0.6), (b, 0.8)], X), rtol=1e-5, atol=1e-5)
    fuse = lorakit.apply(m, (f, 0.5), mode="fuse")
    after_fuse = m(X)
    assert _rel(after_fuse, base) > 0.05
    # fuse on a low-rank layer requantizes its residual and keeps the (longer) branch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuse_lr = lorakit.apply(m, LoRA({"fc1": _lora(14).layers["fc1"]}), mode="fuse")
    assert m.fc1.rank == BRANCH + 4 and "requant_error" in fuse_lr.report.quant["generic:fc1"]
    with pytest.raises(PatchOrderError):
        branch.remove()
    with pytest.raises(PatchOrderError):
        branch.set_strengths([1.0])
    fuse_lr.remove()
    torch.testing.assert_close(m(X), after_fuse, rtol=0, atol=0)
    fuse.remove()
    branch.set_strengths([0.4])  # top of the stack again (the hook below it does not matter)
    torch.testing.assert_close(m(X), _dense(w0, [(h, 0.6), (b, 0.4)], X), rtol=1e-5, atol=1e-5)
    branch.remove()
    hook.remove()
    assert _bits_equal(before, m) and torch.equal(m(X), base)


def test_recipe_branch_where_possible_hook_for_the_rest() -> None:
    """docs/quantized.md: layers without a branch are skipped with strict=False and named in the report; the same
    LoRA cut to those layers goes on in hook mode. Together: the whole LoRA, exact."""
    m = _model()
    before, base, w0 = _snapshot(m), m(X), _weights(m)
    lora = _lora(21, head=True)
    with pytest.warns(UserWarning, match="not applied"):
        branch = lorakit.apply(m, [(lora, 0.8)], mode="branch", strict=False)
    skipped = branch.report.shape_mismatches["0:lora"]
    assert list(skipped) == ["head"]
    rest = LoRA({name: lora.layers[name] for name in skipped})
    hook = lorakit.apply(m, [(rest, 0.8)], mode="hook")
    y = m(X)
    torch.testing.assert_close(y, _dense(w0, [(lora, 0.8)], X), rtol=1e-5, atol=1e-5)
    assert _rel(y, base) > 0.05
    hook.remove()
    branch.remove()
    assert _bits_equal(before, m)
