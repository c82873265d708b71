"""lorakit.ops.svd and lorakit.ops.extract: randomized SVD vs the optimum, exactness at full rank,
verified error bounds, budgets, and extraction from files, folders and pickles (with typed failures)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import FormatError, NonFiniteError, OverwriteError, ShapeMismatchError
from lorakit.ops import extract
from lorakit.ops.svd import allocate_budget, factorise, randomized_svd


def _decaying(m: int, n: int, decay: float = 0.93, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.T


def _optimal_error(a: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(a.double())
    return float((s[k:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_randomized_svd_within_one_percent_of_optimal():
    a = _decaying(400, 300)
    k = 20
    u, s, vh = randomized_svd(a, k)
    err = float(torch.linalg.matrix_norm(a - (u * s) @ vh) / torch.linalg.matrix_norm(a))
    best = _optimal_error(a, k)
    assert best > 0.05  # non-vacuous: rank 20 really loses something
    assert err <= 1.01 * best
    assert u.shape == (400, k) and vh.shape == (k, 300)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (200, 150)])
def test_rank_at_least_full_rank_reconstructs_exactly(shape):
    a = torch.randn(*shape)
    f = factorise(a, rank=max(shape) + 5)
    assert f.rank == min(shape)
    assert torch.allclose(f.up @ f.down, a, atol=1e-5, rtol=1e-5)
    assert f.rel_error < 1e-5
    assert float(a.abs().max()) > 0.5  # non-vacuous input


def test_low_true_rank_is_recovered_exactly_by_the_randomized_path():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 400, generator=g)
    f = factorise(a, rank=8)
    assert f.rel_error < 1e-5
    assert torch.allclose(f.up @ f.down, a, atol=1e-3)


@pytest.mark.parametrize("bound", [0.3, 0.1, 0.05])
def test_max_error_is_verified_by_measurement(bound):
    a = _decaying(300, 200, decay=0.97, seed=2)
    f = factorise(a, max_error=bound)
    measured = float(torch.linalg.matrix_norm(a - f.up @ f.down) / torch.linalg.matrix_norm(a))
    assert measured <= bound
    assert abs(measured - f.rel_error) < 1e-4
    s = torch.linalg.svdvals(a.double())
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]) / (s**2).sum()
    k_opt = int((tail.sqrt() > bound).sum())  # smallest k whose optimal error <= bound
    assert k_opt <= f.rank <= k_opt + 2  # never too small, hardly larger than optimal
    assert f.rank < 200 and f.bound_met  # non-vacuous


def test_energy_mode_keeps_requested_energy():
    a = _decaying(200, 160, decay=0.95, seed=3)
    f = factorise(a, energy=0.9)
    assert f.energy >= 0.9
    assert 1 < f.rank < 160
    assert abs((1 - f.energy) ** 0.5 - f.rel_error) < 1e-3


def test_budget_goes_to_largest_singular_values():
    spectra = {"big": torch.tensor([10.0, 8, 6, 4, 2]), "small": torch.tensor([9.0, 1, 0.5])}
    alloc = allocate_budget(spectra, {"big": 1, "small": 1}, ranks=4)
    assert alloc == {"big": 3, "small": 1}
    # by size: "big" units cost 10x as much, so σ²/byte favours "small"
    alloc = allocate_budget(spectra, {"big": 10, "small": 1}, size=13)
    assert alloc["small"] == 3 and alloc["big"] == 1


# -- extraction from files -----------------------------------------------------------------------------

def _pair_files(tmp_path: Path, *, prefix: str = "") -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(0)
    base = {
        f"{prefix}blocks.0.attn.to_q.weight": torch.randn(64, 48, generator=g),
        f"{prefix}blocks.0.attn.to_q.bias": torch.randn(64, generator=g),
        f"{prefix}blocks.0.conv.weight": torch.randn(32, 16, 3, 3, generator=g),
        f"{prefix}blocks.0.conv.bias": torch.randn(32, generator=g),
        f"{prefix}blocks.0.proj.weight": torch.randn(32, 16, 1, 1, generator=g),
        f"{prefix}blocks.0.norm.weight": torch.ones(48),
        f"{prefix}blocks.0.norm.bias": torch.zeros(48),
        f"{prefix}blocks.1.ff.weight": torch.randn(40, 40, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[f"{prefix}blocks.0.attn.to_q.weight"] += 0.1 * torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g)
    tuned[f"{prefix}blocks.0.attn.to_q.bias"] += 0.01
    tuned[f"{prefix}blocks.0.conv.weight"] += 0.1 * (torch.randn(32, 3, generator=g) @ torch.randn(3, 144, generator=g)).reshape(32, 16, 3, 3)
    tuned[f"{prefix}blocks.0.proj.weight"] += 0.1 * (torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)).reshape(32, 16, 1, 1)
    tuned[f"{prefix}blocks.0.norm.weight"] += 0.1
    tuned[f"{prefix}blocks.0.norm.bias"] -= 0.05
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def _delta(sd: dict, name: str, shape) -> torch.Tensor:
    down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def test_extract_reproduces_low_rank_fine_tune(tmp_path):
    b, t, base, tuned = _pair_files(tmp_path)
    out = tmp_path / "lora.safetensors"
    res = extract(b, t, out, rank=8)
    sd = load_file(out)
    assert res.summary["unchanged"] == 2  # conv.bias and ff.weight did not change
    assert "lora_unet_blocks_1_ff.lora_down.weight" not in sd
    assert sd["lora_unet_blocks_0_conv.lora_down.weight"].shape == (8, 16, 3, 3)
    assert sd["lora_unet_blocks_0_conv.lora_up.weight"].shape == (32, 8, 1, 1)
    assert sd["lora_unet_blocks_0_proj.lora_down.weight"].shape == (8, 16, 1, 1)
    assert float(sd["lora_unet_blocks_0_attn_to_q.alpha"]) == 8.0
    for mod, key in (("attn_to_q", "blocks.0.attn.to_q.weight"), ("conv", "blocks.0.conv.weight"), ("proj", "blocks.0.proj.weight")):
        true = tuned[key] - base[key]
        assert float(true.norm()) > 0.1  # non-vacuous
        got = _delta(sd, f"lora_unet_blocks_0_{mod}", true.shape)
        assert torch.allclose(got, true, atol=1e-5)
    assert torch.allclose(sd["lora_unet_blocks_0_attn_to_q.diff_b"], tuned["blocks.0.attn.to_q.bias"] - base["blocks.0.attn.to_q.bias"])
    assert torch.allclose(sd["lora_unet_blocks_0_norm.w_norm"], torch.full((48,), 0.1), atol=1e-6)
    assert torch.allclose(sd["lora_unet_blocks_0_norm.b_norm"], torch.full((48,), -0.05), atol=1e-6)
    assert res.summary["max_rel_error"] < 1e-5


def test_extract_low_rank_error_matches_optimum_and_options(tmp_path):
    b, t, base, tuned = _pair_files(tmp_path)
    res = extract(b, t, tmp_path / "r2.safetensors", rank=2, conv_rank=1, dtype="bf16", format="peft",
                  include=["*attn*", "*conv*"], exclude=["*.bias"])
    sd = load_file(tmp_path / "r2.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if not k.endswith(".alpha"))
    assert set(sd) == {"blocks.0.attn.to_q.lora_A.weight", "blocks.0.attn.to_q.lora_B.weight",
                       "blocks.0.conv.lora_A.weight", "blocks.0.conv.lora_B.weight"}
    # PEFT keeps alpha in the lora_adapter_metadata header (alpha = rank: scale 1)
    import lorakit
    assert {layer.weight.scale for layer in lorakit.load(tmp_path / "r2.safetensors")} == {1.0}
    assert sd["blocks.0.conv.lora_A.weight"].shape == (1, 16, 3, 3)
    q = next(s for s in res.layers if s["key"] == "blocks.0.attn.to_q.weight")
    true = tuned["blocks.0.attn.to_q.weight"] - base["blocks.0.attn.to_q.weight"]
    best = _optimal_error(true, 2)
    assert best > 0.1 and q["rel_error"] <= 1.01 * best + 1e-6


def test_extract_diff_only_is_exact(tmp_path):
    b, t, base, tuned = _pair_files(tmp_path)
    extract(b, t, tmp_path / "d.safetensors", diff_only=True)
    sd = load_file(tmp_path / "d.safetensors")
    key = "lora_unet_blocks_0_conv.diff"
    assert torch.equal(sd[key], tuned["blocks.0.conv.weight"] - base["blocks.0.conv.weight"])
    assert not any("lora_down" in k for k in sd)


def test_extract_budget_and_max_error(tmp_path):
    b, t, _, _ = _pair_files(tmp_path)
    res = extract(b, t, tmp_path / "b.safetensors", rank=16, rank_budget=5)
    assert res.summary["total_rank"] == 5
    res = extract(b, t, tmp_path / "m.safetensors", rank=16, max_error=0.01)
    ranks = {s["key"]: s["rank"] for s in res.layers if s["kind"] == "lora"}
    assert ranks == {"blocks.0.attn.to_q.weight": 4, "blocks.0.conv.weight": 3, "blocks.0.proj.weight": 2}
    res = extract(b, t, tmp_path / "s.safetensors", rank=16, size_budget_mb=0.0012)
    assert 0 < res.summary["total_rank"] < 9
    assert (tmp_path / "s.safetensors").stat().st_size < 1200 + 4096  # factors within budget, plus header
    # the rank cap stops --max-error: reported, not hidden
    res = extract(b, t, tmp_path / "c.safetensors", rank=1, max_error=0.001)
    assert "blocks.0.attn.to_q.weight" in res.summary["bound_not_met"]
    with pytest.raises(ValueError, match="budget"):
        extract(b, t, tmp_path / "z.safetensors", rank_budget=3, energy=0.9)


def test_extract_from_diffusers_folder_and_pickle(tmp_path):
    g = torch.Generator().manual_seed(5)
    for name, delta in (("base", 0.0), ("tuned", 1.0)):
        w = torch.ones(16, 8)
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "text_encoder").mkdir(parents=True)
        save_file({"down_blocks.0.attn.to_k.weight": w + delta * torch.outer(torch.arange(16.0), torch.ones(8))},
                  tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")
        save_file({"text_model.encoder.layers.0.mlp.fc1.weight": w + delta * 0.5},
                  tmp_path / name / "text_encoder" / "model.safetensors")
    res = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "f.safetensors", rank=1)
    sd = load_file(tmp_path / "f.safetensors")
    assert "lora_unet_down_blocks_0_attn_to_k.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in sd  # kohya SD1 spelling
    assert res.summary["max_rel_error"] < 1e-5
    torch.save({"state_dict": {"a.weight": torch.randn(8, 8, generator=g)}}, tmp_path / "b.pt")
    sd_t = {"a.weight": torch.load(tmp_path / "b.pt")["state_dict"]["a.weight"] + 1.0}
    torch.save(sd_t, tmp_path / "t.ckpt")
    res = extract(tmp_path / "b.pt", tmp_path / "t.ckpt", tmp_path / "p.safetensors", rank=1)
    assert res.summary["lora_layers"] == 1 and res.summary["max_rel_error"] < 1e-5


def test_extract_errors_leave_nothing(tmp_path):
    b, t, base, tuned = _pair_files(tmp_path)
    hashes = (_sha(b), _sha(t))
    out = tmp_path / "x.safetensors"
    bad = dict(tuned)
    bad["blocks.0.attn.to_q.weight"] = torch.randn(64, 40)
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(ShapeMismatchError, match="blocks.0.attn.to_q.weight"):
        extract(b, tmp_path / "shape.safetensors", out)
    missing = {k: v for k, v in tuned.items() if "ff" not in k}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(FormatError, match="blocks.1.ff.weight"):
        extract(b, tmp_path / "missing.safetensors", out)
    nan = dict(tuned)
    nan["blocks.0.proj.weight"] = nan["blocks.0.proj.weight"].clone()
    nan["blocks.0.proj.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match="blocks.0.proj.weight"):
        extract(b, tmp_path / "nan.safetensors", out)
    with pytest.raises(OverwriteError):
        extract(b, t, t)
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert (_sha(b), _sha(t)) == hashes
