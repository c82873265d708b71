"""LyCORIS LoKr: a Kronecker product of two factors, each full or low-rank (``w2`` optionally Tucker).

``ΔW = γ · kron(w1, w2)``; ``w1 = lokr_w1 | lokr_w1_a @ lokr_w1_b``; ``w2 = lokr_w2 | lokr_w2_a @ lokr_w2_b |
einsum('ijhw,jc,ip->pchw', lokr_t2, lokr_w2_b, lokr_w2_a)``; a 4-D ``w2`` makes ``w1`` ``[a, c, 1, 1]``.
``γ = alpha / r`` when a factor is low-rank (``r`` its inner dimension), else 1 (LyCORIS full-matrix mode).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import IncompleteAdapterError, RankMismatchError
from .base import WeightAdapter, register_adapter

__all__ = ["LoKrWeights"]


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class LoKrWeights(WeightAdapter):
    kind = "lokr"
    detect = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    fields = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")
    required = ()

    lokr_w1: torch.Tensor | None = None
    lokr_w1_a: torch.Tensor | None = None
    lokr_w1_b: torch.Tensor | None = None
    lokr_w2: torch.Tensor | None = None
    lokr_w2_a: torch.Tensor | None = None
    lokr_w2_b: torch.Tensor | None = None
    lokr_t2: torch.Tensor | None = None
    alpha: float | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        if self.lokr_w1 is None and (self.lokr_w1_a is None or self.lokr_w1_b is None):
            raise IncompleteAdapterError(f"{name}: LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if self.lokr_w2 is None and (self.lokr_w2_a is None or self.lokr_w2_b is None):
            raise IncompleteAdapterError(f"{name}: LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if self.lokr_w1 is None and self.lokr_w1_a.shape[1] != self.lokr_w1_b.shape[0]:
            raise RankMismatchError(f"{name}: lokr_w1_a {tuple(self.lokr_w1_a.shape)} and lokr_w1_b {tuple(self.lokr_w1_b.shape)} do not fit")
        if self.lokr_w2 is None:
            inner_ok = (
                self.lokr_w2_a.shape[0] == self.lokr_w2_b.shape[0]
                if self.lokr_t2 is not None
                else self.lokr_w2_a.shape[1] == self.lokr_w2_b.shape[0]
            )
            if not inner_ok:
                raise RankMismatchError(f"{name}: lokr_w2_a {tuple(self.lokr_w2_a.shape)} and lokr_w2_b {tuple(self.lokr_w2_b.shape)} do not fit")

    @property
    def rank(self) -> int | None:
        # ComfyUI and LyCORIS take w2's inner dimension when both factors are decomposed.
        if self.lokr_w2_b is not None:
            return int(self.lokr_w2_b.shape[0])
        if self.lokr_w1_b is not None:
            return int(self.lokr_w1_b.shape[0])
        return None

    def w1(self) -> torch.Tensor:
        if self.lokr_w1 is not None:
            return self.lokr_w1.float()
        return self.lokr_w1_a.float() @ self.lokr_w1_b.float()

    def w2(self) -> torch.Tensor:
        if self.lokr_w2 is not None:
            return self.lokr_w2.float()
        if self.lokr_t2 is not None:
            return torch.einsum("ij...,jc,ip->pc...", self.lokr_t2.float(), self.lokr_w2_b.float(), self.lokr_w2_a.float())
        return self.lokr_w2_a.float() @ self.lokr_w2_b.float().flatten(1)

    def out_features(self) -> int:
        a = self.lokr_w1.shape[0] if self.lokr_w1 is not None else self.lokr_w1_a.shape[0]
        b = self.lokr_w2.shape[0] if self.lokr_w2 is not None else (
            self.lokr_w2_a.shape[1] if self.lokr_t2 is not None else self.lokr_w2_a.shape[0]
        )
        return int(a * b)

    def natural_delta(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        # kron views its inputs: the Tucker einsum's output is not contiguous
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale
