"""PEFT ``modules_to_save``: full replacement weights of a module (a classifier head, ``score``), saved beside
the LoRA pairs. Applied as ``W' = W + s · (W_saved − W)``: strength 1 is PEFT's replacement, 0 the base.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ShapeMismatchError, UnsupportedAdapterError
from .base import WeightAdapter, register_adapter

__all__ = ["SavedModule"]


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class SavedModule(WeightAdapter):
    kind = "modules_to_save"
    detect = ("saved_weight",)
    fields = ("saved_weight", "saved_bias")
    required = ("saved_weight",)
    needs_base = True

    saved_weight: torch.Tensor
    saved_bias: torch.Tensor | None = None

    def out_features(self) -> int:
        return int(self.saved_weight.shape[0])

    def delta_numel(self) -> int:
        return self.saved_weight.numel()

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "a modules_to_save replacement is a delta only against a base weight; apply it to a model "
            "(lorakit.apply) rather than merging it on its own"
        )

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        if tuple(base.shape) != tuple(self.saved_weight.shape):
            raise ShapeMismatchError(
                f"modules_to_save weight of shape {tuple(self.saved_weight.shape)} does not fit {tuple(base.shape)}"
            )
        return self.saved_weight.float() - base.detach().float()

    def bias_from_base(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if self.saved_bias is None:
            return None
        if bias is None or bias.numel() != self.saved_bias.numel():
            raise ShapeMismatchError(f"modules_to_save bias of shape {tuple(self.saved_bias.shape)} has no matching bias")
        return self.saved_bias.float().reshape(bias.shape) - bias.detach().float()
