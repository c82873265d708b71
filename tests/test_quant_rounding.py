"""fp8 rounding: ``rounding="stochastic"`` (seeded) is unbiased where round-to-nearest is not.

* :func:`lorakit.quant.round_fp8` on values between two grid points: the mean over many draws is the exact value,
  round-to-nearest is off by the distance to the nearer neighbour; grid points, zero, signs and saturation are kept.
* ``apply(..., mode="fuse", rounding="stochastic", seed=k)`` on float8 storage (fp8 scaled, torchao float8,
  quanto qfloat8): over many seeds the fused weights keep the whole LoRA delta on average, while nearest rounding
  loses most of a small delta; one seed is reproducible and ``remove()`` stays bit-exact; integer storage refuses
  stochastic rounding and is left untouched.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.errors import UnsupportedAdapterError
from lorakit.model import Layer, LoRA
from lorakit.quant import Fp8ScaledLinear, round_fp8

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _has(mod: str) -> bool:
    """Whether ``mod`` is importable; a dotted name whose parent package is missing counts as absent."""
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def _grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of ``dtype``, ascending."""
    bits = torch.arange(0, 128, dtype=torch.int16).to(torch.uint8).view(dtype).float()
    return bits[torch.isfinite(bits)]


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_stochastic_rounding_is_unbiased_nearest_is_not(dtype: torch.dtype) -> None:
    grid = _grid(dtype)
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, len(grid) - 1, (400,), generator=g)
    lo, hi = grid[i], grid[i + 1]
    frac = 0.05 + 0.4 * torch.rand(400, generator=g)  # nearer to lo: nearest rounding always returns lo
    sign = torch.where(torch.rand(400, generator=g) < 0.5, -1.0, 1.0)
    v = sign * (lo + frac * (hi - lo))
    gap = hi - lo
    draws = 4000
    q = round_fp8(v.expand(draws, -1), dtype, "stochastic", torch.Generator().manual_seed(1)).float()
    # every draw is one of the two neighbours
    assert bool(((q.abs() == lo) | (q.abs() == hi)).all())
    bias_sr = (q.mean(0) - v) / gap
    bias_rtn = (round_fp8(v, dtype).float() - v) / gap
    torch.testing.assert_close(bias_rtn.abs(), frac)  # nearest: off by the distance to lo, every time
    # stochastic: the mean of 4000 draws is within ~5 standard errors of the exact value
    assert float(bias_sr.abs().max()) < 5 * 0.5 / draws**0.5
    assert float(bias_sr.abs().mean()) < 0.05 * float(bias_rtn.abs().mean())


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_stochastic_rounding_keeps_grid_points_zero_sign_and_saturates(dtype: torch.dtype) -> None:
    grid = _grid(dtype)
    on_grid = torch.cat([grid, -grid])
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(round_fp8(on_grid, dtype, "stochastic", gen).float(), on_grid)
    big = torch.tensor([1e9, -1e9, float(grid[-1]) * 1.01])
    out = round_fp8(big, dtype, "stochastic", gen).float()
    assert torch.equal(out, torch.tensor([grid[-1], -grid[-1], grid[-1]]))
    tiny = torch.full((1000,), float(grid[1]) / 4)  # a quarter of the smallest subnormal
    hits = round_fp8(tiny, dtype, "stochastic", gen).float()
    assert set(hits.unique().tolist()) == {0.0, float(grid[1])}
    assert abs(float(hits.mean()) - float(tiny[0])) < 0.2 * float(tiny[0])


def test_stochastic_rounding_is_seeded() -> None:
    v = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    a = round_fp8(v, torch.float8_e4m3fn, "stochastic", torch.Generator().manual_seed(5))
    b = round_fp8(v, torch.float8_e4m3fn, "stochastic", torch.Generator().manual_seed(5))
    c = round_fp8(v, torch.float8_e4m3fn, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(a.view(torch.uint8), c.view(torch.uint8))
    with pytest.raises(ValueError, match="stochastic"):
        round_fp8(v, torch.float8_e4m3fn, "up")


# -- through apply ---------------------------------------------------------------------------------------------
IN, OUT, RANK = 64, 48, 4


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, OUT)


def _lora(rel: float) -> tuple[LoRA, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(RANK, IN, generator=g), torch.randn(OUT, RANK, generator=g)
    w_norm = (OUT / 3) ** 0.5  # ‖W‖ of nn.Linear's U(-1/√IN, 1/√IN) init
    k = (rel * w_norm / float((up @ down).norm())) ** 0.5
    down, up = down * k, up * k
    return LoRA({"fc": Layer("fc", None, "fc", weight=LoRAWeights(down, up, alpha=RANK))}), up @ down


def _fp8_scaled(m: One) -> None:
    m.fc = Fp8ScaledLinear.from_linear(m.fc)


def _torchao_fp8(m: One) -> None:
    import torchao.quantization as tq

    tq.quantize_(m, tq.Float8WeightOnlyConfig())


def _quanto_fp8(m: One) -> None:
    import optimum.quanto as oq

    oq.quantize(m, weights=oq.qfloat8)
    oq.freeze(m)


def _deq(m: One) -> torch.Tensor:
    w = m.fc.weight
    if isinstance(m.fc, Fp8ScaledLinear):
        return w.float() * m.fc.weight_scale.float()
    return w.dequantize().float()


def _raw(m: One) -> list[torch.Tensor]:
    w = m.fc.weight
    if isinstance(m.fc, Fp8ScaledLinear):
        parts = [w, m.fc.weight_scale]
    elif hasattr(w, "qdata"):
        parts = [w.qdata, w.scale]
    else:
        parts = [w._data, w._scale]
    return [p.detach().clone().reshape(-1).view(torch.uint8) for p in parts]


BUILDERS = {"fp8-scaled": (_fp8_scaled, "torch"), "torchao-fp8": (_torchao_fp8, "torchao"),
            "quanto-qfloat8": (_quanto_fp8, "optimum.quanto")}


def _model(name: str) -> One:
    build, needs = BUILDERS[name]
    if not _has(needs):
        pytest.skip(f"{needs} not installed (pip install 'lorakit[quant]')")
    torch.manual_seed(0)
    m = One().requires_grad_(False)
    build(m)
    return m


def _retained(fused: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> float:
    """How much of ΔW the fused weight carries: ⟨fused − base, ΔW⟩ / ‖ΔW‖²."""
    return float(((fused - base) * delta).sum() / (delta * delta).sum())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fuse_stochastic_keeps_the_lora_on_average(name: str) -> None:
    m = _model(name)
    lora, delta = _lora(rel=0.005)  # 0.5 % of ‖W‖: mostly below half a float8 step
    base, raw0 = _deq(m), _raw(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-seed error is large (noise); that is the point of the mean
        with lorakit.apply(m, lora, mode="fuse") as patch:
            nearest = _retained(_deq(m), base, delta)
            assert patch.report.quant["generic:fc"]["requant_error"] > 0.5
        seeds = []
        for seed in range(48):
            with lorakit.apply(m, lora, mode="fuse", rounding="stochastic", seed=seed):
                seeds.append(_deq(m))
            assert all(torch.equal(a, b) for a, b in zip(raw0, _raw(m))), "remove() after stochastic fuse"
    mean = torch.stack(seeds).mean(0)
    sr = _retained(mean, base, delta)
    assert nearest < 0.3, f"nearest rounding kept {nearest:.2f} of a 0.5 % delta (expected to lose most)"
    assert abs(sr - 1.0) < 0.1, f"stochastic rounding kept {sr:.3f} of the delta on average (expected 1)"
    # and per seed it is not vacuous: each draw moved the storage
    assert all(not torch.equal(s, base) for s in seeds[:3])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fuse_stochastic_is_reproducible_per_seed(name: str) -> None:
    m = _model(name)
    lora, _ = _lora(rel=0.02)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, seed in (("a", 7), ("b", 7), ("c", 8)):
            with lorakit.apply(m, lora, mode="fuse", rounding="stochastic", seed=seed):
                runs[key] = _raw(m)
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"]))
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"], runs["c"]))


def test_stochastic_warning_does_not_recommend_itself() -> None:
    m = _model("fp8-scaled")
    lora, _ = _lora(rel=0.001)
    with pytest.warns(UserWarning, match="rounding='stochastic' on the float8") as rec:
        lorakit.apply(m, lora, mode="fuse").remove()
    assert "mode='hook'" in str(rec[0].message)
    with pytest.warns(UserWarning, match="keeps the LoRA on average") as rec:
        lorakit.apply(m, lora, mode="fuse", rounding="stochastic").remove()
    assert "rounding='stochastic' on the" not in str(rec[0].message)


@pytest.mark.skipif(not _has("torchao"), reason="torchao not installed")
def test_stochastic_on_integer_storage_refuses_and_changes_nothing() -> None:
    import torchao.quantization as tq

    torch.manual_seed(0)
    m = One().requires_grad_(False)
    tq.quantize_(m, tq.Int8WeightOnlyConfig())
    raw0 = _raw(m)
    lora, _ = _lora(rel=0.05)
    with pytest.raises(UnsupportedAdapterError, match="rounding='stochastic'.*mode='hook'"):
        lorakit.apply(m, lora, mode="fuse", rounding="stochastic")
    assert all(torch.equal(a, b) for a, b in zip(raw0, _raw(m)))
    with pytest.raises(ValueError, match="rounding"):
        lorakit.apply(m, lora, mode="fuse", rounding="up")
