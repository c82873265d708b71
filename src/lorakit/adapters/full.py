"""Full-weight deltas: LyCORIS/LightX2V ``diff`` and LyCORIS norm ``w_norm`` (``ΔW = diff``, no scaling)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedAdapterError
from .base import WeightAdapter, register_adapter

__all__ = ["FullDiff", "NormDiff"]


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class FullDiff(WeightAdapter):
    kind = "full"
    detect = ("diff",)
    fields = ("diff",)
    required = ("diff",)

    diff: torch.Tensor

    def out_features(self) -> int:
        return int(self.diff.shape[0])

    def natural_delta(self) -> torch.Tensor:
        return self.diff.float()

    def delta_numel(self) -> int:
        return self.diff.numel()

    @classmethod
    def from_delta(cls, delta: torch.Tensor) -> FullDiff:
        return cls(delta)


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class NormDiff(WeightAdapter):
    """LyCORIS ``NormModule``: a delta on a LayerNorm/GroupNorm weight (its bias delta is ``b_norm``)."""

    kind = "norm"
    detect = ("w_norm",)
    fields = ("w_norm",)
    required = ("w_norm",)

    w_norm: torch.Tensor

    def out_features(self) -> int:
        return int(self.w_norm.shape[0])

    def natural_delta(self) -> torch.Tensor:
        return self.w_norm.float()

    def delta_numel(self) -> int:
        return self.w_norm.numel()

    @classmethod
    def from_delta(cls, delta: torch.Tensor) -> NormDiff:
        return cls(delta)

    def unfused_problem(self, module: nn.Module) -> str | None:
        return "a norm delta (w_norm) has no unfused path: a norm is not linear in its weight alone"

    def delta_output(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        raise UnsupportedAdapterError("norm deltas (w_norm) have no unfused path; apply with mode='fuse'")
