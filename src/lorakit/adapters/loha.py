"""LyCORIS LoHa: a Hadamard product of two low-rank products.

``ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, ``r = hada_w1_b.shape[0]``; ``w*_a [out, r]``,
``w*_b [r, in·kh·kw]``. Tucker (``hada_t1``/``hada_t2 [r, r, kh, kw]``): ``w*_a [r, out]``, ``w*_b [r, in]``,
``m = einsum('ijhw,jc,ip->pchw', t, w_b, w_a)``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import IncompleteAdapterError, RankMismatchError
from .base import WeightAdapter, register_adapter

__all__ = ["LoHaWeights"]


def _tucker(t: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij...,jc,ip->pc...", t.float(), w_b.float(), w_a.float())


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class LoHaWeights(WeightAdapter):
    kind = "loha"
    detect = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    fields = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    hada_w1_a: torch.Tensor
    hada_w1_b: torch.Tensor
    hada_w2_a: torch.Tensor
    hada_w2_b: torch.Tensor
    hada_t1: torch.Tensor | None = None
    hada_t2: torch.Tensor | None = None
    alpha: float | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        if (self.hada_t1 is None) != (self.hada_t2 is None):
            raise IncompleteAdapterError(f"{name}: LoHa Tucker needs both hada_t1 and hada_t2")
        r = self.rank
        if self.hada_t1 is not None:
            ok = self.hada_w1_a.shape[0] == r and self.hada_w2_a.shape[0] == r and self.hada_w2_b.shape[0] == r
        else:
            ok = (
                self.hada_w1_a.shape[1] == r
                and self.hada_w2_b.shape[0] == self.hada_w2_a.shape[1]
                and self.hada_w1_a.shape[0] == self.hada_w2_a.shape[0]
                and self.hada_w1_b.shape[1:] == self.hada_w2_b.shape[1:]
            )
        if not ok:
            shapes = {f: tuple(t.shape) for f, t in self.tensors().items()}
            raise RankMismatchError(f"{name}: LoHa factor shapes do not fit together: {shapes}")

    @property
    def rank(self) -> int:
        return int(self.hada_w1_b.shape[0])

    def out_features(self) -> int:
        return int(self.hada_w1_a.shape[1] if self.hada_t1 is not None else self.hada_w1_a.shape[0])

    def natural_delta(self) -> torch.Tensor:
        if self.hada_t1 is not None:
            m1 = _tucker(self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            m2 = _tucker(self.hada_t2, self.hada_w2_b, self.hada_w2_a)
        else:
            m1 = self.hada_w1_a.float() @ self.hada_w1_b.float().flatten(1)
            m2 = self.hada_w2_a.float() @ self.hada_w2_b.float().flatten(1)
        return m1 * m2 * self.scale
