"""lorakit.ops.compose and resize: exact weighted sums (strength 0.5 is 0.5, not kohya's 0.25), mixed adapter
types, refactorisation with reported errors equal to the optimum, and resize via QR + core SVD."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.adapters import DoRA, LoHaWeights, LoRAWeights
from lorakit.errors import UnsupportedAdapterError
from lorakit.model import Layer, LoRA
from lorakit.ops import compose, resize
from lorakit.ops.common import load_lora


def _lora_file(path, seed: int, rank: int, alpha: float, layers=("attn_to_q", "conv")):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in layers:
        if name == "conv":
            sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, 16, 3, 3, generator=g)
            sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(32, rank, 1, 1, generator=g)
        else:
            sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, 48, generator=g)
            sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(64, rank, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return path


def _deltas(path) -> dict[str, torch.Tensor]:
    return {layer.name: layer.delta_weight() for layer in load_lora(path)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_compose_is_exact_weighted_sum_with_different_ranks_and_alphas(tmp_path):
    a = _lora_file(tmp_path / "a.safetensors", 1, 4, 2.0)
    b = _lora_file(tmp_path / "b.safetensors", 2, 8, 16.0, layers=("attn_to_q", "conv", "ff"))
    res = compose([(a, 0.7), (b, -0.3)], tmp_path / "c.safetensors")
    da, db, dc = _deltas(a), _deltas(b), _deltas(tmp_path / "c.safetensors")
    assert set(dc) == {"lora_unet_attn_to_q", "lora_unet_conv", "lora_unet_ff"}  # union of layer sets
    for name in ("lora_unet_attn_to_q", "lora_unet_conv"):
        want = 0.7 * da[name] + -0.3 * db[name]
        assert float(want.norm()) > 1.0  # non-vacuous
        assert torch.allclose(dc[name], want, atol=1e-4, rtol=1e-5)
    assert torch.allclose(dc["lora_unet_ff"], -0.3 * db["lora_unet_ff"], atol=1e-5)
    sd = load_file(tmp_path / "c.safetensors")
    assert sd["lora_unet_conv.lora_down.weight"].shape == (12, 16, 3, 3)
    assert float(sd["lora_unet_conv.alpha"]) == 12.0
    assert res.summary["exact"] and res.summary["max_rel_error"] == 0.0


def test_single_lora_at_half_strength_is_half(tmp_path):
    a = _lora_file(tmp_path / "a.safetensors", 3, 4, 1.0)
    compose([(a, 0.5)], tmp_path / "h.safetensors")
    da, dh = _deltas(a), _deltas(tmp_path / "h.safetensors")
    for name in da:
        assert torch.allclose(dh[name], 0.5 * da[name], atol=1e-6)
        assert not torch.allclose(dh[name], 0.25 * da[name], atol=1e-3)


def test_compose_loha_plus_lora_goes_through_the_full_delta(tmp_path):
    g = torch.Generator().manual_seed(4)
    loha = LoHaWeights(torch.randn(64, 2, generator=g), torch.randn(2, 48, generator=g),
                       torch.randn(64, 2, generator=g), torch.randn(2, 48, generator=g), alpha=1.0)
    lora = LoRAWeights(torch.randn(3, 48, generator=g), torch.randn(64, 3, generator=g), alpha=3.0)
    x = LoRA({"lora_unet_attn_to_q": Layer("lora_unet_attn_to_q", "denoiser", "attn_to_q", True, weight=loha)})
    y = LoRA({"lora_unet_attn_to_q": Layer("lora_unet_attn_to_q", "denoiser", "attn_to_q", True, weight=lora,
                                           bias=torch.ones(64))})
    want = 0.6 * loha.delta_weight() + 0.9 * lora.delta_weight()
    res = compose([(x, 0.6), (y, 0.9)], tmp_path / "m.safetensors")
    sd = load_file(tmp_path / "m.safetensors")
    assert torch.allclose(sd["lora_unet_attn_to_q.diff"], want, atol=1e-5)
    assert torch.allclose(sd["lora_unet_attn_to_q.diff_b"], torch.full((64,), 0.9))
    assert res.layers[0]["method"] == "dense"
    # with --rank the dense sum is refactorised; the reported error is the optimum for that rank
    res = compose([(x, 0.6), (y, 0.9)], tmp_path / "m4.safetensors", rank=4)
    got = _deltas(tmp_path / "m4.safetensors")["lora_unet_attn_to_q"]
    s = torch.linalg.svdvals(want.double())
    best = float((s[4:] ** 2).sum().sqrt() / s.norm())
    assert best > 0.01
    assert abs(_rel(got, want) - res.layers[0]["rel_error"]) < 1e-4
    assert res.layers[0]["rel_error"] <= 1.01 * best + 1e-6


def test_compose_with_rank_reports_the_optimal_error_and_clamp_is_opt_in(tmp_path):
    a = _lora_file(tmp_path / "a.safetensors", 5, 8, 8.0)
    b = _lora_file(tmp_path / "b.safetensors", 6, 8, 4.0)
    want = {n: 1.0 * _deltas(a)[n] + 0.5 * _deltas(b)[n] for n in _deltas(a)}
    res = compose([(a, 1.0), (b, 0.5)], tmp_path / "r.safetensors", rank=6)
    got = _deltas(tmp_path / "r.safetensors")
    for stat in res.layers:
        w = want[stat["layer"]]
        s = torch.linalg.svdvals(w.flatten(1).double())
        best = float((s[6:] ** 2).sum().sqrt() / s.norm())
        assert best > 0.05
        assert stat["rank"] == 6 and stat["method"] == "qr-svd"
        assert abs(stat["rel_error"] - best) < 1e-5
        assert abs(_rel(got[stat["layer"]], w) - best) < 1e-4
    clamped = compose([(a, 1.0), (b, 0.5)], tmp_path / "q.safetensors", rank=16, clamp_quantile=0.9)
    exact = compose([(a, 1.0), (b, 0.5)], None, rank=16)
    assert exact.summary["max_rel_error"] == 0.0
    assert clamped.summary["max_rel_error"] > 0.01


def test_compose_dora_needs_base(tmp_path):
    g = torch.Generator().manual_seed(7)
    w = LoRAWeights(torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), alpha=2.0)
    layer = Layer("lora_unet_x", "denoiser", "x", True, weight=w, dora=DoRA(torch.ones(4, 1), "out"))
    with pytest.raises(UnsupportedAdapterError, match="base"):
        compose([(LoRA({"lora_unet_x": layer}), 1.0)], tmp_path / "d.safetensors")
    base = {"x.weight": torch.randn(4, 8, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    compose([(LoRA({"lora_unet_x": layer}), 1.0)], tmp_path / "d.safetensors", base=tmp_path / "base.safetensors")
    sd = load_file(tmp_path / "d.safetensors")
    assert torch.allclose(sd["lora_unet_x.diff"], layer.delta_weight(base=base["x.weight"]), atol=1e-6)


# -- resize -------------------------------------------------------------------------------------------

def test_resize_rank_is_optimal_and_reports_energy(tmp_path):
    a = _lora_file(tmp_path / "a.safetensors", 8, 16, 4.0)
    res = resize(a, tmp_path / "r.safetensors", rank=5)
    old, new = _deltas(a), _deltas(tmp_path / "r.safetensors")
    sd = load_file(tmp_path / "r.safetensors")
    assert sd["lora_unet_conv.lora_down.weight"].shape == (5, 16, 3, 3)
    for stat in res.layers:
        w = old[stat["layer"]].flatten(1).double()
        s = torch.linalg.svdvals(w)
        energy = float((s[:5] ** 2).sum() / (s**2).sum())
        assert 0.2 < energy < 0.99  # non-vacuous
        assert abs(stat["energy"] - energy) < 1e-6
        assert abs(_rel(new[stat["layer"]].flatten(1).double(), w) - (1 - energy) ** 0.5) < 1e-4
    # rank >= current rank: unchanged and exact
    same = resize(a, tmp_path / "same.safetensors", rank=32)
    assert all(s["rel_error"] == 0.0 for s in same.layers)
    assert all(torch.allclose(_deltas(tmp_path / "same.safetensors")[n], old[n]) for n in old)


def test_resize_energy_and_max_error(tmp_path):
    a = _lora_file(tmp_path / "a.safetensors", 9, 16, 16.0)
    res = resize(a, tmp_path / "e.safetensors", energy=0.8)
    assert all(s["energy"] >= 0.8 and s["new_rank"] < 16 for s in res.layers)
    res = resize(a, tmp_path / "m.safetensors", max_error=0.3)
    new, old = _deltas(tmp_path / "m.safetensors"), _deltas(a)
    for s in res.layers:
        assert _rel(new[s["layer"]], old[s["layer"]]) <= 0.3
        assert s["new_rank"] < 16


def test_resize_loha_tucker_and_dora_through_the_delta(tmp_path):
    g = torch.Generator().manual_seed(10)
    loha = LoHaWeights(torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g),
                       torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g), alpha=2.0)
    tucker = LoRAWeights(torch.randn(4, 16, 1, 1, generator=g), torch.randn(32, 4, 1, 1, generator=g), alpha=4.0,
                         mid=torch.randn(4, 4, 3, 3, generator=g))
    dora = DoRA(torch.rand(64, 1) + 0.5, "out")
    lo = LoRA({
        "lora_unet_h": Layer("lora_unet_h", "denoiser", "h", True, weight=loha, dora=dora),
        "lora_unet_t": Layer("lora_unet_t", "denoiser", "t", True, weight=tucker),
    })
    res = resize(lo, tmp_path / "x.safetensors", rank=8)
    out = load_lora(tmp_path / "x.safetensors")
    h = out.layers["lora_unet_h"]
    assert h.weight.kind == "lora" and h.dora is not None and torch.equal(h.dora.magnitude, dora.magnitude)
    loha_delta = loha.delta_weight()
    stat = {s["layer"]: s for s in res.layers}
    s = torch.linalg.svdvals(loha_delta.double())
    best = float((s[8:] ** 2).sum().sqrt() / s.norm())
    assert best > 0.01 and abs(_rel(h.weight.delta_weight(), loha_delta) - best) < 1e-3
    assert abs(stat["lora_unet_h"]["rel_error"] - best) < 1e-3
    t = out.layers["lora_unet_t"].weight
    assert t.down.shape == (4, 16, 3, 3) and t.mid is None  # Tucker rank 4 fits in rank 8 exactly
    assert _rel(t.delta_weight(), tucker.delta_weight()) < 1e-5


def test_resize_turns_full_diffs_into_lora_and_keeps_1d_diffs(tmp_path):
    g = torch.Generator().manual_seed(11)
    diff = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    save_file({"diffusion_model.blocks.0.q.diff": diff, "diffusion_model.blocks.0.norm.diff": torch.ones(30)},
              tmp_path / "lx.safetensors")
    res = resize(tmp_path / "lx.safetensors", tmp_path / "lx3.safetensors", rank=3)
    sd = load_file(tmp_path / "lx3.safetensors")
    assert torch.equal(sd["diffusion_model.blocks.0.norm.diff"], torch.ones(30))
    assert sd["diffusion_model.blocks.0.q.lora_down.weight"].shape == (3, 30)
    got = _deltas(tmp_path / "lx3.safetensors")["diffusion_model.blocks.0.q"]
    assert float(diff.norm()) > 1 and _rel(got, diff) < 1e-5
    assert res.layers[0]["old_rank"] is None and res.layers[0]["new_rank"] == 3
