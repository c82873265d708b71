"""LyCORIS GLoRA: a low-rank delta plus a low-rank transform of the base weight's input side.

File fields (LyCORIS ``GLoRAModule``, keys ``<module>.a1.weight`` … ``.bm.weight``; canonical ``glora_a1`` …):
``a1 [in, r(,1,1)]``, ``a2 [r, in(,1,1)]``, ``b1 [out, r(,1,1)]``, ``b2 [r, in, k…]`` (or ``[r, in, 1, 1]`` with a
Tucker core ``bm [r, r, k…]``), ``alpha``. With ``A = a1 @ a2 [in, in]`` and ``B = b1 @ b2`` (Tucker:
``einsum('mn…,im,nj->ij…', bm, b1, b2)``), ``ΔW = γ · (W ×₁ A + B)`` where ``W ×₁ A`` multiplies the weight's input
axis by ``A`` (``W @ A`` for a Linear, per kernel tap for a conv) and ``γ = alpha / r`` (``r = a2``'s rows; alpha 0 or
absent means ``γ = 1``, as LyCORIS reads it). ``ΔW`` depends on the base weight (:attr:`needs_base`);
:func:`lorakit.placement.bind_layer` makes it a full diff (fuse rounds once; hook mode adds ``ΔW·x``).

Strength ``s``: ``W + s·ΔW``, exactly LyCORIS' ``multiplier`` (its delta is linear in the multiplier too).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import FormatError, RankMismatchError, ShapeMismatchError, UnsupportedAdapterError
from .base import WeightAdapter, register_adapter

__all__ = ["GLoRA"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(t.shape[0], -1)


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class GLoRA(WeightAdapter):
    kind = "glora"
    detect = ("glora_a1", "glora_a2", "glora_b1", "glora_b2", "glora_bm")
    fields = ("glora_a1", "glora_a2", "glora_b1", "glora_b2", "glora_bm", "alpha")
    required = ("glora_a1", "glora_a2", "glora_b1", "glora_b2")
    needs_base = True

    glora_a1: torch.Tensor
    glora_a2: torch.Tensor
    glora_b1: torch.Tensor
    glora_b2: torch.Tensor
    glora_bm: torch.Tensor | None = None
    alpha: float | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        a1, a2, b1, b2 = self.glora_a1, self.glora_a2, self.glora_b1, self.glora_b2
        r = a2.shape[0]
        if a1.shape[1] != r or a1.shape[0] != a2.shape[1]:
            raise RankMismatchError(f"{name}: GLoRA a1 {tuple(a1.shape)} and a2 {tuple(a2.shape)} do not form an "
                                    "[in, r] @ [r, in] transform")
        if any(d != 1 for t in (a1, a2) for d in t.shape[2:]) or any(d != 1 for d in b1.shape[2:]):
            raise FormatError(f"{name}: GLoRA a1/a2/b1 must be 1x1 on a conv, got {tuple(a1.shape)}, "
                              f"{tuple(a2.shape)}, {tuple(b1.shape)}")
        inner = b2.shape[0] if self.glora_bm is None else self.glora_bm.shape[1]
        if self.glora_bm is not None and (self.glora_bm.shape[0] != b1.shape[1] or b2.shape[0] != inner):
            raise RankMismatchError(f"{name}: GLoRA Tucker core bm {tuple(self.glora_bm.shape)} does not join b1 "
                                    f"{tuple(b1.shape)} and b2 {tuple(b2.shape)}")
        if self.glora_bm is None and b1.shape[1] != inner:
            raise RankMismatchError(f"{name}: GLoRA b1 {tuple(b1.shape)} and b2 {tuple(b2.shape)} do not fit")
        if b2.shape[1] != a1.shape[0]:
            raise FormatError(f"{name}: GLoRA b2 {tuple(b2.shape)} and a1 {tuple(a1.shape)} disagree on the input size")

    @property
    def rank(self) -> int | None:
        return int(self.glora_a2.shape[0])

    @property
    def scale(self) -> float:
        # LyCORIS: "alpha = lora_dim if alpha is None or alpha == 0"
        return float(self.alpha) / self.rank if self.alpha else 1.0

    def out_features(self) -> int:
        return int(self.glora_b1.shape[0])

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "a GLoRA delta transforms the base weight: apply it to a model (lorakit.apply), or merge it into a base "
            "checkpoint, rather than computing it on its own"
        )

    def low_rank_part(self) -> torch.Tensor:
        """fp32 ``B`` (no scale) in the weight's shape: ``b1 @ b2``, or the Tucker chain through ``bm``."""
        if self.glora_bm is not None:
            return torch.einsum("mn...,im,nj->ij...", self.glora_bm.float(), _flat(self.glora_b1), _flat(self.glora_b2))
        b2 = self.glora_b2
        return (_flat(self.glora_b1) @ _flat(b2)).reshape(self.out_features(), *b2.shape[1:])

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        w = base.detach().float()
        b = self.low_rank_part().to(w.device)
        if w.dim() < 2 or b.numel() != w.numel() or w.shape[0] != b.shape[0]:
            raise ShapeMismatchError(f"GLoRA delta of shape {tuple(b.shape)} does not fit a weight of shape "
                                     f"{tuple(w.shape)} (old LyCORIS GLoRA files, a1 [r, in] / b2 [out, r], are "
                                     "not supported: re-save the network with a current LyCORIS)")
        a = (_flat(self.glora_a1) @ _flat(self.glora_a2)).to(w.device)  # [in, in]
        wa = torch.einsum("oi...,ij->oj...", w, a)
        return (wa + b.reshape(w.shape)) * self.scale
