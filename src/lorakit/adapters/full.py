"""Full-weight deltas: LyCORIS/LightX2V ``diff`` and LyCORIS norm ``w_norm`` (``ΔW = diff``, no scaling)."""

from __future__ import annotations

import dataclasses

import torch

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

    def delta_output(self, x, module):  # norms are not linear in their weight alone: fuse instead
        from ..errors import UnsupportedAdapterError

        raise UnsupportedAdapterError("norm deltas (w_norm) have no unfused path; apply with mode='fuse'")
