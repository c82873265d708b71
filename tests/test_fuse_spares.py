"""The fast fuse path: a switch writes into the tensor freed by the previous remove, remove stays bit-exact,
and the chunked path equals a plain fp32 reference rounded once."""

import torch

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
