"""Runtime apply, case table: adapter type x dtype crossed with fused == hooked, bit-exact remove,
strength 0 identity, strength linearity, and non-vacuity (the LoRA changes the output)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import DoRA, FullDiff, LoHaWeights, LoKrWeights, LoRAWeights
from lorakit.errors import MatchError
from lorakit.model import Layer, LoRA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fused (rounded once) vs hooked (branch computed in the dtype): relative tolerance per dtype
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 12)
        self.conv1 = nn.Conv2d(4, 6, 1)
        self.conv3 = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fc(x), self.conv1(img), self.conv3(img)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.3


def _cases() -> dict[str, Layer]:
    torch.manual_seed(1)
    return {
        "lora": Layer("fc", None, "fc", weight=LoRAWeights(r(4, 16), r(12, 4), alpha=2.0)),
        "conv_lora_1x1": Layer("conv1", None, "conv1", weight=LoRAWeights(r(2, 4, 1, 1), r(6, 2, 1, 1), alpha=1.0)),
        "conv_lora_3x3": Layer("conv3", None, "conv3", weight=LoRAWeights(r(2, 4, 3, 3), r(6, 2, 1, 1), alpha=4.0)),
        "tucker": Layer("conv3", None, "conv3", weight=LoRAWeights(r(2, 4, 1, 1), r(6, 2, 1, 1), alpha=2.0, mid=r(2, 2, 3, 3))),
        "loha": Layer("fc", None, "fc", weight=LoHaWeights(r(12, 3), r(3, 16), r(12, 3), r(3, 16), alpha=3.0)),
        "lokr": Layer("fc", None, "fc", weight=LoKrWeights(lokr_w1=r(3, 4), lokr_w2=r(4, 4))),
        "dora_out": Layer("fc", None, "fc", weight=LoRAWeights(r(4, 16), r(12, 4)), dora=DoRA(torch.rand(12, 1) + 0.5, "out")),
        "dora_in": Layer("fc", None, "fc", weight=LoRAWeights(r(4, 16), r(12, 4)), dora=DoRA(torch.rand(1, 16) + 0.5, "in")),
        "full_diff": Layer("conv3", None, "conv3", weight=FullDiff(r(6, 4, 3, 3))),
        "diff_b": Layer("fc", None, "fc", bias=r(12)),
        "lora_B_bias": Layer("fc", None, "fc", weight=LoRAWeights(r(4, 16), r(12, 4), alpha=4.0, up_bias=r(12))),
    }


CASES = _cases()


def _model(dtype: torch.dtype) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 16, generator=g).to(dtype), torch.randn(2, 4, 5, 5, generator=g).to(dtype)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], m: nn.Module) -> bool:
    # bit-exact: compare the raw bits so that -0.0 vs 0.0 or NaN payloads would also be caught
    return all(torch.equal(a[k].view(torch.uint8), v.view(torch.uint8)) for k, v in m.state_dict().items())


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = b.float().abs().max().clamp_min(1e-3)
    return bool(((a.float() - b.float()).abs().max() / scale) <= TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_hooked_and_remove_is_exact(case: str, dtype: torch.dtype) -> None:
    model, x = _model(dtype), _inputs(dtype)
    before, base_out = _state(model), model(*x)
    lora = LoRA({CASES[case].name: CASES[case]})

    patch = lorakit.apply(model, [(lora, 0.7)], mode="fuse")
    fused = model(*x)
    assert not _same(before, model), "fusing changed no weight"
    patch.remove()
    assert _same(before, model)

    hook = lorakit.apply(model, [(lora, 0.7)], mode="hook")
    assert _same(before, model), "hook mode must not touch weights"
    hooked = model(*x)
    hook.remove()
    assert _same(before, model)
    assert all(torch.equal(a, b) for a, b in zip(model(*x), base_out)), "hooks were not detached"

    changed = [i for i in range(3) if not torch.equal(fused[i], base_out[i])]
    assert changed, "the LoRA changed no output (vacuous case)"
    for i in changed:
        assert _close(hooked[i], fused[i], dtype), f"output {i}: hooked != fused"
        assert not _close(base_out[i], fused[i], torch.float32), "change below tolerance: case too weak"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_strength_zero_is_identity(mode: str, dtype: torch.dtype) -> None:
    model, x = _model(dtype), _inputs(dtype)
    before, base_out = _state(model), model(*x)
    lora = LoRA({k: CASES[k] for k in ("lora", "conv_lora_3x3", "diff_b")})  # several layers at once
    patch = lorakit.apply(model, [(lora, 0.0)], mode=mode)
    assert _same(before, model)
    assert all(torch.equal(a, b) for a, b in zip(model(*x), base_out))
    patch.remove()
    # and non-vacuous: strength 1 does change the outputs
    with lorakit.apply(model, [(lora, 1.0)], mode=mode):
        assert not torch.equal(model(*x)[0], base_out[0])


@pytest.mark.parametrize("case", ["lora", "loha", "full_diff", "diff_b", "dora_out"])
def test_strength_is_linear(case: str) -> None:
    model = _model(torch.float32).double()  # float64 so linearity is checked without rounding noise
    lora = LoRA({"x": CASES[case]})
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {}
    for s in (1.0, 2.5, -0.5):
        with lorakit.apply(model, [(lora, s)]):
            deltas[s] = {k: v - w0[k] for k, v in model.state_dict().items()}
    key = max(deltas[1.0], key=lambda k: deltas[1.0][k].abs().max())
    assert deltas[1.0][key].abs().max() > 0
    torch.testing.assert_close(deltas[2.5][key], 2.5 * deltas[1.0][key], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(deltas[-0.5][key], -0.5 * deltas[1.0][key], rtol=1e-9, atol=1e-12)


def test_hook_strengths_change_live() -> None:
    model, x = _model(torch.float32), _inputs(torch.float32)
    base = model(*x)[0]
    patch = lorakit.apply(model, [(LoRA({"fc": CASES["lora"]}), 1.0)], mode="hook")
    one = model(*x)[0]
    patch.set_strengths([2.0])
    two = model(*x)[0]
    torch.testing.assert_close(two - base, 2 * (one - base), rtol=1e-4, atol=1e-5)
    patch.set_strengths([0.0])
    assert torch.equal(model(*x)[0], base)
    patch.remove()
    with pytest.raises(lorakit.UnsupportedAdapterError):
        lorakit.apply(model, [(LoRA({"fc": CASES["lora"]}), 1.0)]).set_strengths([1.0])


def test_unmatched_warns_once_and_strict_raises() -> None:
    model = _model(torch.float32)
    before = _state(model)
    lora = LoRA({"fc": CASES["lora"], "nowhere": Layer("nowhere", None, "blocks.9.nowhere", bias=r(3))})
    with pytest.warns(UserWarning, match="nowhere") as rec:
        patch = lorakit.apply(model, lora)
    assert len([w for w in rec if "not applied" in str(w.message)]) == 1
    assert patch.report.counts()["0:lora"] == {"matched": 1, "unmatched": 1, "shape_mismatches": 0}
    patch.remove()
    with pytest.raises(MatchError, match="nowhere"):
        lorakit.apply(model, lora, strict=True)
    assert _same(before, model)
    with pytest.raises(MatchError, match="matched a module"):
        lorakit.apply(model, LoRA({"nowhere": lora.layers["nowhere"]}))


@pytest.mark.parametrize("mode", ["fuse", "hook"])
def test_shape_mismatch_reported_and_strict(mode: str) -> None:
    model = _model(torch.float32)
    before = _state(model)
    bad = Layer("fc_bad", None, "fc", weight=LoRAWeights(r(4, 10), r(12, 4)))
    lora = LoRA({"fc_bad": bad, "conv1": CASES["conv_lora_1x1"]})
    with pytest.raises(MatchError, match="fc_bad"):
        lorakit.apply(model, lora, strict=True, mode=mode)
    assert _same(before, model)
    x = _inputs(torch.float32)
    y0 = model(*x)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        patch = lorakit.apply(model, lora, mode=mode)
    assert "fc_bad" in patch.report.shape_mismatches["0:lora"]
    y = model(*x)
    assert torch.equal(y[0], y0[0]) and not torch.equal(y[1], y0[1])
    patch.remove()
    assert _same(before, model)


def test_rows_and_transform_targets() -> None:
    """src_rows / dst_rows / swap_scale_shift through a family alias, fused == hooked."""
    from lorakit.families import Family, Target

    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k = nn.Linear(8, 4), nn.Linear(8, 4)
            self.fused = nn.Linear(8, 8)
            self.norm = nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.to_q(x), self.to_k(x), self.fused(x), self.norm(x)], -1)

    class Fam(Family):
        name = "testrows"

        def matches_model(self, component: str, module: nn.Module) -> bool:
            return isinstance(module, QKV)

        def aliases(self, component: str, module: nn.Module):
            yield "qk", [Target(component, "to_q", src_rows=(0, 4)), Target(component, "to_k", src_rows=(4, 8))]
            yield "half_a", Target(component, "fused", dst_rows=(0, 4))
            yield "ada", Target(component, "norm", transform="swap_scale_shift")

    torch.manual_seed(0)
    model, x = QKV(), torch.randn(2, 8)
    layers = {
        "qk": Layer("qk", None, "qk", weight=LoRAWeights(r(2, 8), r(8, 2)), bias=r(8)),
        "half_a": Layer("half_a", None, "half_a", weight=LoHaWeights(r(4, 2), r(2, 8), r(4, 2), r(2, 8))),
        "ada": Layer("ada", None, "ada", weight=FullDiff(r(6, 8))),
    }
    from lorakit.families import base as fam_base

    fam_base.FAMILIES.append(Fam())
    try:
        before, y0 = _state(model), model(x)
        lora = LoRA(layers)
        with lorakit.apply(model, lora, component="generic") as p:
            fused = model(x)
            assert p.report.counts()["0:lora"]["matched"] == 3
            qk = layers["qk"].weight.delta_weight()
            torch.testing.assert_close(model.to_k.weight - before["to_k.weight"], qk[4:8], atol=1e-6, rtol=0)
            torch.testing.assert_close(model.to_k.bias - before["to_k.bias"], layers["qk"].bias[4:8], atol=1e-6, rtol=0)
            assert torch.equal(model.fused.weight[4:], before["fused.weight"][4:])
            d = layers["ada"].weight.delta_weight()
            torch.testing.assert_close(model.norm.weight - before["norm.weight"], torch.cat([d[3:], d[:3]]), atol=1e-6, rtol=0)
        assert _same(before, model)
        with lorakit.apply(model, lora, mode="hook", component="generic"):
            hooked = model(x)
        torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused, y0)
    finally:
        fam_base.FAMILIES.remove(next(f for f in fam_base.FAMILIES if f.name == "testrows"))


def test_modulation_param_fuses_and_hooks() -> None:
    class Mod(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.modulation = nn.Parameter(torch.randn(1, 6, 4))

    model = Mod()
    before = _state(model)
    diff_m = r(1, 6, 4)
    lora = LoRA({"blk": Layer("blk", None, "blk", params={"modulation": diff_m})})
    outer = nn.Module()
    outer.blk = model
    with lorakit.apply(outer, lora):
        torch.testing.assert_close(model.modulation - before["modulation"], diff_m, atol=1e-6, rtol=0)
    assert _same(before, model)
    # hook mode materialises W + s·ΔW into a separate tensor; strengths change it live; remove is bit-exact
    with lorakit.apply(outer, lora, mode="hook") as patch:
        torch.testing.assert_close(model.modulation - before["modulation"], diff_m, atol=1e-6, rtol=0)
        patch.set_strengths([0.5])
        torch.testing.assert_close(model.modulation - before["modulation"], 0.5 * diff_m, atol=1e-6, rtol=0)
    assert _same(before, model)


def test_param_stats_and_report() -> None:
    model = _model(torch.float32)
    lora = LoRA({"fc": CASES["lora"]})
    with lorakit.apply(model, lora) as patch:
        stats = patch.param_stats()
        assert stats["lora_parameters"] == 4 * 16 + 12 * 4
        assert stats["total_parameters"] == sum(p.numel() for p in model.parameters())
        assert 0 < stats["ratio"] < 1
        assert patch.report.matched["0:lora"] == {"fc": ["generic:fc"]}
        assert patch.report.untouched_modules == 2
        assert "1 layers matched" in patch.report.summary()
