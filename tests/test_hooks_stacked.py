"""Hook mode stacks the plain LoRAs of one patch on a module into one GEMM pair (``down`` factors concatenated
along the rank, ``up`` factors scaled by ``strength · α/r``) added into the output in place: the output equals the
per-LoRA sum, strengths stay live (0 drops a LoRA from the stack), autograd and autocast still work, and a 1×1
conv is stacked too."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.adapters import LoRAWeights
from lorakit.model import Layer, LoRA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 20)
        self.conv = nn.Conv2d(20, 12, 1)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 6, 24]
        h = self.lin(x)  # [B, 6, 20]
        h = h.transpose(1, 2).reshape(x.shape[0], 20, 2, 3)
        return self.conv3(self.conv(h))


def _lora(seed: int, rank: int = 4, alpha: float | None = 2.0) -> LoRA:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    return LoRA({
        "lin": Layer("lin", None, "lin", weight=LoRAWeights(rnd(rank, 24), rnd(20, rank), alpha)),
        "conv": Layer("conv", None, "conv", weight=LoRAWeights(rnd(rank, 20, 1, 1), rnd(12, rank, 1, 1), alpha)),
        "conv3": Layer("conv3", None, "conv3", weight=LoRAWeights(rnd(rank, 12, 3, 3), rnd(8, rank, 1, 1), alpha)),
    })


def _model() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


def _reference(model: _Net, loras: list[tuple[LoRA, float]], x: torch.Tensor) -> torch.Tensor:
    """The output with ``W + Σ sᵢ ΔWᵢ`` in fp32 on a copy: what the hooks must add up to."""
    ref = _Net()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("lin", "conv", "conv3"):
            w = getattr(ref, name).weight
            w += sum(s * lo.layers[name].delta_weight().reshape(w.shape) for lo, s in loras)
        return ref(x)


def test_stacked_hooks_equal_the_sum_and_strengths_stay_live() -> None:
    model, x = _model(), torch.randn(2, 6, 24)
    loras = [_lora(1), _lora(2, rank=8, alpha=None), _lora(3, rank=2, alpha=8.0)]
    with torch.no_grad():
        y0 = model(x)
        patch = lorakit.apply(model, [(lo, s) for lo, s in zip(loras, (1.0, 0.5, -0.75))], mode="hook")
        y = model(x)
        assert (y - y0).abs().max() > 0.1  # the LoRAs changed the output
        torch.testing.assert_close(y, _reference(model, list(zip(loras, (1.0, 0.5, -0.75))), x), rtol=1e-5, atol=1e-5)
        patch.set_strengths([0.0, 2.0, 0.0])
        torch.testing.assert_close(model(x), _reference(model, [(loras[1], 2.0)], x), rtol=1e-5, atol=1e-5)
        patch.set_strengths([0.0, 0.0, 0.0])
        assert torch.equal(model(x), y0)
        patch.remove()
        assert torch.equal(model(x), y0)


class _CountMM(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_three_loras_on_a_linear_cost_one_gemm_pair() -> None:
    lin = nn.Sequential(nn.Linear(32, 32))
    loras = [LoRA({"0": Layer("0", None, "0", weight=LoRAWeights(torch.randn(4, 32), torch.randn(32, 4)))}) for _ in range(3)]
    x = torch.randn(5, 32)
    with torch.no_grad(), lorakit.apply(lin, [(lo, 0.5) for lo in loras], mode="hook"):
        lin(x)  # builds the stack
        with _CountMM() as c:
            lin(x)
    assert c.n == 3  # the base Linear's addmm, then down and up of the stack (one each), not 2 per LoRA


def test_autograd_and_autocast_still_work() -> None:
    model, lo = _model(), _lora(4)
    x = torch.randn(2, 6, 24, requires_grad=True)
    with lorakit.apply(model, [(lo, 1.0)], mode="hook"):
        y = model(x)
        y.sum().backward()  # the in-place add is skipped when autograd records the output
        assert x.grad is not None and x.grad.abs().sum() > 0
        with torch.no_grad():
            torch.testing.assert_close(y.detach(), _reference(model, [(lo, 1.0)], x.detach()), rtol=1e-5, atol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            yb = model(x.detach())
        assert torch.isfinite(yb).all()
        torch.testing.assert_close(yb.float(), y.detach(), rtol=0.05, atol=0.05)
