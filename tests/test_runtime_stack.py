"""Stacking and exactness of runtime patches: several LoRAs per call, a second apply on top, removal
newest first (bit-exact), 1000 bf16 apply/remove cycles, and transactional failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.errors import MatchError, NonFiniteError
from lorakit.model import Layer, LoRA
from lorakit.runtime import PatchOrderError


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)).to(dtype)


def _lora(seed: int, scale: float = 0.3, paths: tuple[str, ...] = ("0", "2")) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for p in paths:
        rows = 16 if p == "0" else 8  # Linear(16, 16) then Linear(16, 8)
        layers[p] = Layer(p, None, p, weight=LoRAWeights(torch.randn(4, 16, generator=g) * scale, torch.randn(rows, 4, generator=g) * scale))
    return LoRA(layers)


def _bits(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.uint8) for k, v in m.state_dict().items()}


def _equal(before: dict[str, torch.Tensor], m: nn.Module) -> bool:
    return all(torch.equal(before[k], v.detach().view(torch.uint8)) for k, v in m.state_dict().items())


def test_one_call_sums_in_fp32_and_rounds_once() -> None:
    model = _net(torch.bfloat16)
    w0 = model[0].weight.detach().clone()
    a, b = _lora(1), _lora(2)
    with lorakit.apply(model, [(a, 0.5), (b, -1.25)]):
        expected = (w0.float() + 0.5 * a.layers["0"].delta_weight() - 1.25 * b.layers["0"].delta_weight()).to(torch.bfloat16)
        assert torch.equal(model[0].weight, expected)
        assert not torch.equal(model[0].weight, w0)


def test_second_apply_stacks_and_removal_is_reverse_only() -> None:
    model = _net()
    x = torch.randn(3, 16)
    before, y0 = _bits(model), model(x)
    p1 = lorakit.apply(model, [(_lora(1), 1.0)])
    y1 = model(x)
    p2 = lorakit.apply(model, [(_lora(2), 1.0)], mode="hook")
    p3 = lorakit.apply(model, [(_lora(3), 0.5)])
    y3 = model(x)
    assert not torch.allclose(y1, y0) and not torch.allclose(y3, y1)
    with pytest.raises(PatchOrderError, match="reverse order"):
        p1.remove()
    with pytest.raises(PatchOrderError):
        p2.remove()
    assert torch.equal(model(x), y3), "a refused removal changed the model"
    p3.remove()
    p2.remove()
    assert torch.equal(model(x), y1)
    p1.remove()
    assert _equal(before, model)
    assert torch.equal(model(x), y0)
    p1.remove()  # idempotent


def test_fused_stack_equals_single_call_within_rounding() -> None:
    model = _net()
    x = torch.randn(3, 16)
    with lorakit.apply(model, [(_lora(1), 1.0), (_lora(2), 0.5)]):
        together = model(x)
    with lorakit.apply(model, [(_lora(1), 1.0)]), lorakit.apply(model, [(_lora(2), 0.5)]):
        stacked = model(x)
    torch.testing.assert_close(stacked, together, rtol=1e-5, atol=1e-6)


def test_thousand_cycles_bf16_bit_exact() -> None:
    model = _net(torch.bfloat16)
    before = _bits(model)
    lora = _lora(7)
    for i in range(1000):
        patch = lorakit.apply(model, [(lora, 0.8)])
        if i == 0:
            assert not _equal(before, model)
        patch.remove()
    assert _equal(before, model)


def test_non_finite_result_leaves_model_untouched() -> None:
    model = _net(torch.float16)
    before = _bits(model)
    huge = _lora(3, scale=300.0)  # fp16 overflows to inf on layer "2" only, after layer "0" was computed
    with pytest.raises(NonFiniteError, match="nothing was changed"):
        lorakit.apply(model, [(_lora(1), 1.0), (huge, 1.0)])
    assert _equal(before, model)


def test_strict_shape_mismatch_leaves_model_untouched() -> None:
    model = _net()
    before = _bits(model)
    g = torch.Generator().manual_seed(0)
    bad = Layer("2", None, "2", weight=LoRAWeights(torch.randn(4, 16, generator=g), torch.randn(5, 4, generator=g)))
    lora = LoRA({"0": _lora(1).layers["0"], "2": bad})
    with pytest.raises(MatchError, match=r"shape mismatches:\n  0:lora: 2:"):
        lorakit.apply(model, lora, strict=True)
    assert _equal(before, model)


def test_hook_error_leaves_no_hook() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    x = torch.randn(2, 4)
    y0 = model(x)
    from lorakit.adapters import NormDiff

    lora = LoRA({"0": Layer("0", None, "0", bias=torch.ones(4)), "1": Layer("1", None, "1", weight=NormDiff(torch.ones(4)))})
    # a layer that cannot be applied (NaN factors in hook mode) fails the whole apply: no hook stays behind
    bad = LoRA({**lora.layers, "2": Layer("2", None, "0", bias=torch.full((4,), float("nan")))})
    with pytest.raises(lorakit.LorakitError):
        lorakit.apply(model, bad, mode="hook")
    assert torch.equal(model(x), y0)
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    with lorakit.apply(model, lora, mode="hook"):  # hook mode handles the norm delta by value
        assert not torch.equal(model(x), y0)
    assert torch.equal(model(x), y0)
    with lorakit.apply(model, lora):  # fuse mode handles the norm delta
        assert not torch.equal(model(x), y0)
    assert torch.equal(model(x), y0)
