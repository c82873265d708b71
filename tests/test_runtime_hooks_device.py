"""The hook path moves a LoRA's factors once, at apply time, to the module's dtype and device: a forward pass
never copies them (counted through Tensor.to), and a module that moves (CPU offload) gets one copy per place."""

from __future__ import annotations

import torch
from torch import nn

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA


def _lora(dtype=torch.float32) -> LoRA:
    g = torch.Generator().manual_seed(0)
    w = LoRAWeights(up=torch.randn(8, 2, generator=g, dtype=dtype), down=torch.randn(2, 8, generator=g, dtype=dtype),
                    alpha=2.0)
    return LoRA({"fc": Layer("fc", None, "fc", weight=w)})


class Counter:
    def __init__(self, monkeypatch) -> None:
        self.copies = 0
        original = torch.Tensor.to

        def counting(t, *args, **kwargs):
            out = original(t, *args, **kwargs)
            if out is not t and out.numel() >= 16:  # a real copy of a factor-sized tensor
                self.copies += 1
            return out

        monkeypatch.setattr(torch.Tensor, "to", counting)


def test_forward_never_copies_factors(monkeypatch):
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 8))
    model = model.to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    base = model(x)
    patch = lorakit.apply(model, _lora(torch.float32), mode="hook")  # fp32 file on a bf16 model: cast once here
    counter = Counter(monkeypatch)
    with torch.no_grad():
        outs = [model(x) for _ in range(5)]
    assert counter.copies == 0
    assert (outs[0].float() - base.float()).abs().max() > 1e-2  # the LoRA is on
    assert all(torch.equal(o, outs[0]) for o in outs)
    patch.remove()


def test_a_moving_module_gets_one_copy_per_place(monkeypatch):
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 8))
    x = torch.randn(4, 8)
    lorakit.apply(model, _lora(), mode="hook")
    with torch.no_grad():
        model.to(torch.float64)  # stands in for offload moving the module (no GPU here): a new place
        counter = Counter(monkeypatch)
        for _ in range(3):
            y = model(x.double())
        assert counter.copies == 2  # up and down, once
        model.to(torch.float32)
        before = counter.copies - 1  # the module's own weight moved back (one copy of 64 values)
        for _ in range(3):
            model(x)
        assert counter.copies - 1 == before  # back to the first place: its copy is still there
    assert y.dtype == torch.float64
