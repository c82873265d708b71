"""Low-rank LoRA (Linear and conv "LoCon"), with optional Tucker ``mid`` and PEFT ``lora_B.bias``.

Shapes: Linear ``down [r, in]``, ``up [out, r]``; conv ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``;
Tucker ``down [r, in, 1, 1]``, ``mid [r, r, kh, kw]``, ``up [out, r, 1, 1]``.
``ΔW = (alpha / r) · up @ down`` (Tucker: ``Σ up[o,i] mid[i,j,h,w] down[j,c]``), ``r = down.shape[0]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError, RankMismatchError
from .base import LowRank, RowPick, WeightAdapter, register_adapter

__all__ = ["LoRAWeights"]


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class LoRAWeights(WeightAdapter):
    kind = "lora"
    detect = ("down", "up")
    fields = ("down", "up", "alpha", "mid", "up_bias")
    required = ("down", "up")

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    #: PEFT ``lora_B.bias`` (``[out]``): adds ``(alpha/r) · up_bias`` to the module bias
    up_bias: torch.Tensor | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        r = self.down.shape[0]
        if self.down.dim() not in (2, 3, 4, 5) or self.up.dim() not in (2, 3, 4, 5):
            raise FormatError(f"{name}: lora down/up must be 2-D to 5-D, got {tuple(self.down.shape)} / {tuple(self.up.shape)}")
        if self.up.shape[1] != r:
            raise RankMismatchError(
                f"{name}: up {tuple(self.up.shape)} has inner dimension {self.up.shape[1]} but down "
                f"{tuple(self.down.shape)} has rank {r}; the pair does not belong together."
            )
        if self.mid is not None and (self.mid.dim() < 3 or self.mid.shape[0] != r or self.mid.shape[1] != r):
            raise RankMismatchError(f"{name}: mid {tuple(self.mid.shape)} does not match rank {r}")
        if self.up_bias is not None and self.up_bias.shape != (self.up.shape[0],):
            raise FormatError(f"{name}: lora_B.bias {tuple(self.up_bias.shape)} must be [{self.up.shape[0]}]")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def out_features(self) -> int:
        return int(self.up.shape[0])

    def natural_delta(self) -> torch.Tensor:
        down = self.down.float()
        up = self.up.float().flatten(1)
        if self.mid is not None:
            mid = self.mid.float()
            delta = torch.einsum("ij...,oi,jc->oc...", mid, up, down.flatten(1))
        else:
            delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return delta * self.scale

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.up_bias is None else self.up_bias.float() * self.scale

    def low_rank(self) -> LowRank | None:
        # Tucker (mid) and k×k ``up`` kernels do not flatten to one product
        if self.mid is not None or any(k != 1 for k in self.up.shape[2:]):
            return None
        return LowRank(self.up.flatten(1), self.down.flatten(1), self.scale, tuple(self.down.shape[1:]))

    def slice_rows(self, pick: RowPick) -> LoRAWeights:
        # ΔW's rows are ``up``'s rows times the shared ``down`` (and ``mid``): picking rows of ``up`` is exact
        up_bias = None if self.up_bias is None else pick(self.up_bias)
        return dataclasses.replace(self, up=pick(self.up), up_bias=up_bias)

    def delta_numel(self) -> int:
        if self.mid is not None:
            return int(self.up.shape[0]) * int(self.down.shape[1]) * math.prod(self.mid.shape[2:])
        return int(self.up.shape[0]) * math.prod(self.down.shape[1:])

    def delta_output(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """Two small GEMMs/convs (``x → down → up``) instead of ``ΔW``: Linear with 2-D factors and ungrouped
        Conv2d; anything else runs the materialised delta (the base class)."""
        if getattr(module, "groups", 1) != 1:
            return super().delta_output(x, module)
        dtype = x.dtype
        down = self.down.to(device=x.device, dtype=dtype)
        up = self.up.to(device=x.device, dtype=dtype)
        if isinstance(module, nn.Conv2d) and (down.dim() == 4 or module.weight.dim() == 4):
            if down.dim() == 2:
                down = down[:, :, None, None]
            if up.dim() == 2:
                up = up[:, :, None, None]
            if self.mid is not None:
                h = F.conv2d(x, down)
                h = F.conv2d(h, self.mid.to(device=x.device, dtype=dtype), None, module.stride, module.padding, module.dilation)
            else:
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
            return F.conv2d(h, up) * self.scale
        if down.dim() == 2 and up.dim() == 2:
            return F.linear(F.linear(x, down), up) * self.scale
        return super().delta_output(x, module)
