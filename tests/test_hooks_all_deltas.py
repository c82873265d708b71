"""Hook mode for every delta kind: norm weights, modulation tables (``diff_m``), biases of non-linear modules and
weight diffs on modules with no linear op are materialised into separate tensors (``W + Σ sᵢ ΔWᵢ``, fp32, rounded
once) whenever the strengths change; ``remove()`` puts the very original tensors back. The LightX2V Wan distill
case (LoRA pairs + diff_b + norm diffs + diff_m) works in both modes and agrees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import FullDiff, NormDiff
from lorakit.errors import PatchOrderError
from lorakit.model import Layer, LoRA

pytest.importorskip("diffusers")
from test_families_wan import PAIRS, _factors, _file, _inputs, _lightx2v, _load, _model  # noqa: E402


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> the tensor object each parameter/buffer holds now (not a copy)."""
    return {k: p.data for k, p in model.named_parameters()}


def _assert_same_objects(model: nn.Module, before: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for k, p in model.named_parameters():
        assert p.data.data_ptr() == before[k].data_ptr() and p.dtype == before[k].dtype, k
        assert torch.equal(p.data, values[k]), k


def _distill_state():
    """A LightX2V-style Wan distill file: lora_up/down pairs (with alpha) on the linears, plus diff_b on some of
    their biases, norm diffs (weight and bias), full diffs, the patch embedding and the diff_m modulation tables."""
    extra, _ = _lightx2v(False, seed=11)
    full = {k.rsplit(".", 1)[0] for k in extra if k.endswith(".diff")}
    pairs = [p for p in PAIRS if f"diffusion_model.{p[0]}" not in full]
    return _file(pairs, _factors(pairs, seed=4), "comfyui", alpha=1.0) | extra


def _out(model):
    with torch.no_grad():
        return model(**_inputs(False)).sample


def test_wan_lightx2v_distill_hook_equals_fuse_live_strengths_and_exact_remove():
    state = _distill_state()
    lora = _load(state)
    kinds = lora.adapter_types()
    assert {"lora", "full", "diff_b", "diff_m"} <= set(kinds), kinds
    base = _model()
    base_out = _out(base)
    fused = copy.deepcopy(base)
    hooked = copy.deepcopy(base)
    before = _tensors(hooked)
    values = {k: t.clone() for k, t in before.items()}
    with lorakit.apply(fused, (lora, 1.0), strict=True):
        fused_1 = _out(fused)
    with lorakit.apply(fused, (lora, 0.5), strict=True):
        fused_half = _out(fused)
        fused_half_params = {k: p.detach().clone() for k, p in fused.named_parameters()}
    patch = lorakit.apply(hooked, (lora, 1.0), mode="hook", strict=True)
    hook_1 = _out(hooked)
    torch.testing.assert_close(hook_1, fused_1, rtol=1e-4, atol=1e-5)
    assert (hook_1 - base_out).abs().max() > 1e-2  # the LoRA changed the output
    # the table, the norm weights and biases were materialised: modulation and norms really took their deltas
    assert not torch.equal(hooked.scale_shift_table, before["scale_shift_table"])
    assert not torch.equal(hooked.blocks[0].attn1.norm_q.weight, before["blocks.0.attn1.norm_q.weight"])
    # the Linear weights are left alone in hook mode (their LoRA runs as a hook)
    assert hooked.blocks[0].attn1.to_q.weight.data.data_ptr() == before["blocks.0.attn1.to_q.weight"].data_ptr()
    patch.set_strengths([0.5])
    hook_half = _out(hooked)
    torch.testing.assert_close(hook_half, fused_half, rtol=1e-4, atol=1e-5)
    assert (hook_half - hook_1).abs().max() > 1e-3
    # a value-patched parameter equals the fused one bit for bit (same arithmetic, rounded once)
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.1.norm2.weight", "blocks.1.norm2.bias"):
        assert torch.equal(dict(hooked.named_parameters())[name], fused_half_params[name]), name
    patch.set_strengths([0.0])
    assert torch.equal(_out(hooked), base_out)
    patch.set_strengths([1.0])
    torch.testing.assert_close(_out(hooked), hook_1, rtol=0, atol=0)
    patch.remove()
    _assert_same_objects(hooked, before, values)
    assert torch.equal(_out(hooked), base_out)


class _ModModel(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8).to(dtype)
        self.norm = nn.LayerNorm(8).to(dtype)
        self.rms = nn.RMSNorm(8).to(dtype)
        self.blk = nn.Module()
        self.blk.modulation = nn.Parameter(torch.randn(1, 2, 8, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.blk.modulation.unbind(1)
        return self.rms(self.norm(self.fc(x)) * (1 + scale) + shift)


def _param_lora(seed: int = 1) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    return LoRA({
        "norm": Layer("norm", None, "norm", weight=NormDiff(r(8)), bias=r(8), bias_key="b_norm"),
        "rms": Layer("rms", None, "rms", weight=FullDiff(r(8))),
        "blk": Layer("blk", None, "blk", params={"modulation": r(1, 2, 8)}),
    })


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_norm_modulation_bias_slots_equal_fuse_bit_for_bit(dtype):
    model = _ModModel(dtype)
    x = torch.randn(3, 8, dtype=dtype)
    y0 = model(x)
    before = _tensors(model)
    values = {k: t.clone() for k, t in before.items()}
    lora = _param_lora()
    for s in (1.0, 0.3):
        with lorakit.apply(model, (lora, s), component="generic", strict=True):
            fused = {k: p.detach().clone() for k, p in model.named_parameters()}
            yf = model(x)
        patch = lorakit.apply(model, (lora, 1.0), mode="hook", component="generic", strict=True)
        patch.set_strengths([s])
        for k, p in model.named_parameters():
            assert torch.equal(p, fused[k]) and p.dtype == dtype, k
        assert torch.equal(model(x), yf)
        assert not torch.equal(yf, y0)
        assert patch.report.touched_tensors == 4  # norm weight + bias, rms weight, modulation
        patch.remove()
        _assert_same_objects(model, before, values)


def test_set_strengths_after_a_later_patch_on_the_same_parameter_is_refused_and_changes_nothing():
    model = _ModModel(torch.float32)
    lora = _param_lora()
    first = lorakit.apply(model, lora, mode="hook", component="generic")
    table = model.blk.modulation.data
    second = lorakit.apply(model, (_param_lora(2), 1.0), component="generic")  # fused on top
    fused_table = model.blk.modulation.data
    with pytest.raises(PatchOrderError, match="later patch"):
        first.set_strengths([0.5])
    assert first.strengths == [1.0] and same_ptr(model.blk.modulation.data, fused_table)
    second.remove()
    assert same_ptr(model.blk.modulation.data, table)
    first.set_strengths([0.5])
    first.remove()


def same_ptr(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr()


def test_non_finite_materialisation_refuses_before_any_change():
    model = _ModModel(torch.float16)
    before = _tensors(model)
    values = {k: t.clone() for k, t in before.items()}
    lora = LoRA({"blk": Layer("blk", None, "blk", params={"modulation": torch.full((1, 2, 8), 1e4)})})
    patch = lorakit.apply(model, (lora, 1.0), mode="hook", component="generic")
    with pytest.raises(lorakit.NonFiniteError):
        patch.set_strengths([100.0])
    assert patch.strengths == [1.0]
    patch.remove()
    _assert_same_objects(model, before, values)
    with pytest.raises(lorakit.NonFiniteError):
        lorakit.apply(model, (lora, 100.0), mode="hook", component="generic")
    _assert_same_objects(model, before, values)
