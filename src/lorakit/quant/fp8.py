"""float8 helpers: round-to-nearest and seeded stochastic rounding onto the e4m3/e5m2 grids (ComfyUI's fp8 LoRA
behaviour: unbiased in expectation), and :class:`Fp8ScaledLinear`, the "fp8 scaled" layer of ComfyUI checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_DTYPES", "Fp8ScaledLinear", "round_fp8"]

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None)


def _max_bits(dtype: torch.dtype) -> int:
    """Bit pattern (sign cleared) of the largest finite value of ``dtype``."""
    return int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(torch.uint8).item())


def round_fp8(values: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``values`` (fp32) onto the ``dtype`` grid, saturating at its finite maximum. ``"stochastic"`` picks the upper
    of the two neighbouring grid points with probability ``(v - lo) / (hi - lo)``, so ``E[q] = v`` exactly."""
    limit = torch.finfo(dtype).max
    v = values.float().clamp(-limit, limit)
    if rounding == "nearest":
        return v.to(dtype)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    mag = v.abs()
    near = mag.to(dtype)
    bits = near.view(torch.uint8).to(torch.int16)
    near_f = near.float()
    # the other neighbour is one step up or down in the (monotonic, sign-cleared) bit pattern
    other_bits = torch.where(near_f > mag, bits - 1, bits + 1).clamp(0, _max_bits(dtype))
    other = other_bits.to(torch.uint8).view(dtype).float()
    lo, hi = torch.minimum(near_f, other), torch.maximum(near_f, other)
    gap = hi - lo
    p_up = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    u = torch.rand(mag.shape, generator=generator, device=mag.device)
    picked = torch.where(u < p_up, hi, lo)
    return (picked * torch.sign(v)).to(dtype)


class Fp8ScaledLinear(nn.Linear):
    """A Linear whose ``weight`` is stored in float8 with a separate ``weight_scale`` (a scalar, or one per output
    row): ``W = weight.float() * weight_scale``, the layout of ComfyUI's "fp8 scaled" checkpoints. The forward
    dequantizes into the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fp8: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        dtype = fp8 or FP8_DTYPES[0]
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(()))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, per_row: bool = False, fp8: torch.dtype | None = None) -> Fp8ScaledLinear:
        """Quantize a float Linear (absmax scale, per tensor or per output row)."""
        dtype = fp8 or FP8_DTYPES[0]
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, fp8=dtype)
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
        scale = (amax / torch.finfo(dtype).max).clamp_min(1e-12)
        out.weight = nn.Parameter(round_fp8(w / scale, dtype), requires_grad=False)
        out.weight_scale = scale
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
