"""(IA)³: a learned vector scaling the weight's output rows or input columns (LyCORIS ``IA3Module``, PEFT ``ia3_l``).

Fields: ``ia3_weight`` (LyCORIS ``weight``: ``[n]`` for a Linear, ``[1, n, 1, …]`` for a conv; PEFT ``ia3_l``:
``[out, 1]`` or, feed-forward, ``[1, in]``) and ``on_input`` (LyCORIS' flag: 1 scales input columns, 0 output rows;
without it, a ``[1, n]`` vector is input side and anything else output side). ``ΔW = W ⊙ v`` broadcast on that axis,
so at strength ``s`` the weight is ``W ⊙ (1 + s·v)``: exactly LyCORIS' ``multiplier``. (PEFT stores the full scale
``W ⊙ v``, initialised to 1, not a delta: such a vector is read as LyCORIS' delta form only if converted first.)
The delta depends on the base weight (:attr:`needs_base`): :func:`lorakit.placement.bind_layer` makes it a full diff.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ShapeMismatchError, UnsupportedAdapterError
from .base import WeightAdapter, register_adapter

__all__ = ["IA3"]


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class IA3(WeightAdapter):
    kind = "ia3"
    detect = ("on_input", "ia3_weight")
    fields = ("ia3_weight", "on_input")
    required = ("ia3_weight",)
    needs_base = True

    ia3_weight: torch.Tensor
    on_input: torch.Tensor | None = None

    @property
    def input_side(self) -> bool:
        if self.on_input is not None:
            return bool(int(self.on_input.reshape(-1)[0].item()))
        v = self.ia3_weight
        return v.dim() == 2 and v.shape[0] == 1 and v.shape[1] != 1

    def out_features(self) -> int:
        return 0 if self.input_side else int(self.ia3_weight.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_weight": self.ia3_weight}  # on_input is a flag, not a parameter

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "an (IA)^3 delta scales the base weight: apply it to a model (lorakit.apply) rather than computing it alone"
        )

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        w = base.detach().float()
        v = self.ia3_weight.float().reshape(-1).to(w.device)
        axis = 1 if self.input_side else 0
        if w.dim() < 2 or w.shape[axis] != v.numel():
            side = "input" if axis else "output"
            raise ShapeMismatchError(f"(IA)^3 vector of {v.numel()} values does not fit the {side} side of a weight "
                                     f"of shape {tuple(w.shape)}")
        shape = [1] * w.dim()
        shape[axis] = -1
        return w * v.reshape(shape)
