"""The fast fuse path: a switch writes into the tensor freed by the previous remove, remove stays bit-exact,
and the chunked path equals a plain fp32 reference rounded once."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA
from lorakit.runtime import fuse as fuse_mod


def _lora(seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    w = LoRAWeights(torch.randn(4, 600, generator=g), torch.randn(700, 4, generator=g), alpha=2.0)
    return LoRA({"lin": Layer("lin", "denoiser", "lin", weight=w)})


def test_switch_reuses_spare_and_remove_is_exact() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Sequential()
        model.add_module("lin", torch.nn.Linear(600, 700).to(dtype))
        original = model.lin.weight.data
        snap = original.clone()
        p = lorakit.apply(model, _lora(1), strict=False)
        fused_ptr = model.lin.weight.data_ptr()
        f32 = snap.float() + 0.5 * _lora(1).layers["lin"].weight.up @ _lora(1).layers["lin"].weight.down
        assert torch.equal(model.lin.weight.data, f32.to(dtype))  # rounded once from fp32 (2 chunks of rows)
        assert not torch.equal(model.lin.weight.data, snap)  # the LoRA changed the weight
        p.remove()
        assert model.lin.weight.data_ptr() == original.data_ptr() and torch.equal(model.lin.weight.data, snap)
        p = lorakit.apply(model, _lora(2), strict=False)
        assert model.lin.weight.data_ptr() == fused_ptr  # written into the buffer the remove freed
        p.remove()
        assert torch.equal(model.lin.weight.data, snap)
        assert fuse_mod.drop_spares() >= original.numel() * original.element_size()


def test_large_fused_tensors_on_huge_pages_are_exact_and_ordinary_tensors(tmp_path) -> None:
    """A fused CPU tensor of 4 MiB or more is allocated on an anonymous mapping advised for huge pages: it is exact,
    survives the allocation's scope, saves and loads, moves, and its memory goes with it."""
    import gc



    lin = nn.Linear(1024, 1200)  # 4.7 MiB of fp32 weight
    w0 = lin.weight.detach().clone()
    down, up = torch.randn(8, 1024) * 0.1, torch.randn(1200, 8) * 0.1
    lora = LoRA({"0": Layer("0", None, "0", weight=LoRAWeights(down, up, 8.0))})
    model = nn.Sequential(lin)
    fuse_mod.drop_spares()
    patch = lorakit.apply(model, [(lora, 0.5)])
    w = model[0].weight
    want = torch.addmm(w0, up, down, alpha=0.5)
    assert torch.equal(w.detach(), want) and not torch.equal(w.detach(), w0)
    gc.collect()
    assert torch.equal(model[0].weight.detach(), want)  # the mapping lives as long as the tensor
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["0.weight"], want)
    assert torch.equal(model[0].weight.detach().to(torch.float64).float(), want)
    patch.remove()
    assert torch.equal(model[0].weight.detach(), w0)
    if fuse_mod._HUGE:
        big = fuse_mod._empty(torch.empty(2048, 1024))
        assert big.shape == (2048, 1024) and big.dtype == torch.float32
        big.fill_(1.5)
        assert float(big.sum()) == 1.5 * 2048 * 1024


def test_the_finiteness_screen_runs_only_where_the_fused_value_can_overflow() -> None:
    from lorakit.errors import NonFiniteError

    small = [(torch.randn(8, 4), torch.randn(4, 8), 1.0)]
    assert not fuse_mod._may_overflow(torch.float32, small) and not fuse_mod._may_overflow(torch.bfloat16, small)
    assert fuse_mod._may_overflow(torch.float16, small)  # fp16's range is small: always screened
    huge = [(torch.full((8, 4), 1e20), torch.full((4, 8), 1e20), 1.0)]
    assert fuse_mod._may_overflow(torch.float32, huge)
    model = nn.Sequential(nn.Linear(8, 8))
    w0 = model[0].weight.detach().clone()
    lora = LoRA({"0": Layer("0", None, "0", weight=LoRAWeights(torch.full((4, 8), 1e20), torch.full((8, 4), 1e20)))})
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        lorakit.apply(model, [(lora, 1.0)])
    assert torch.equal(model[0].weight.detach(), w0)  # nothing was applied


def test_fp16_screen_catches_overflow_from_the_unrounded_value_and_passes_values_that_round_finite() -> None:
    from lorakit.errors import NonFiniteError

    model = nn.Sequential(nn.Linear(8, 8)).half()
    w0 = model[0].weight.detach().clone()
    big = LoRA({"0": Layer("0", None, "0", weight=LoRAWeights(torch.full((4, 8), 300.0), torch.full((8, 4), 300.0),
                                                            alpha=4.0))})
    with pytest.raises(NonFiniteError, match="NaN/Inf"):  # 4·300·300 = 360000 overflows fp16
        lorakit.apply(model, [(big, 1.0)])
    assert torch.equal(model[0].weight.detach(), w0)
    # W + Δ just above 65504 in fp32 rounds to 65504 in fp16: finite, applied
    with torch.no_grad():
        model[0].weight.zero_()
    edge = LoRA({"0": Layer("0", None, "0", weight=LoRAWeights(torch.full((1, 8), 1.0), torch.full((8, 1), 65510.0),
                                                             alpha=1.0))})
    with lorakit.apply(model, [(edge, 1.0)]):
        assert torch.equal(model[0].weight.detach(), torch.full((8, 8), 65504.0, dtype=torch.float16))
    assert torch.equal(model[0].weight.detach(), torch.zeros(8, 8, dtype=torch.float16))


def test_the_alias_index_is_reused_for_the_same_modules_and_rebuilt_when_the_tree_changes() -> None:
    from lorakit.families import base

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    first = base.build_index({"denoiser": model})
    again = base.build_index({"denoiser": model})
    assert again._map == first._map and again._map is not first._map
    assert again.modules["denoiser"]["0"] is model[0]
    model[1] = nn.Linear(8, 8)  # a replaced module: the index names the new one
    rebuilt = base.build_index({"denoiser": model})
    assert rebuilt.modules["denoiser"]["1"] is model[1]
    model.add_module("extra", nn.Linear(8, 8))
    assert base.build_index({"denoiser": model}).lookup("denoiser", "extra") is not None
    assert len(base._INDEX_CACHE) <= base._INDEX_CACHE_SIZE
