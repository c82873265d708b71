"""LyCORIS diag-OFT: a block-diagonal orthogonal rotation of the weight's output rows, via the Cayley transform.

File fields (LyCORIS ``DiagOFTModule``): ``oft_blocks [k, b, b]`` (``k·b = out``), optional ``rescale [out, 1, …]``,
``alpha`` (the constraint: 0/absent = unconstrained). Per block, ``Q = B − Bᵀ``; constrained (``alpha > 0``), ``Q`` is
scaled down to norm ``alpha · out`` when its Frobenius norm (over all blocks) exceeds it; ``R = (I + Q)(I − Q)⁻¹``.
The rotated weight is ``W'ₖ = Rₖᵀ Wₖ`` on the rows of block ``k`` (LyCORIS' ``einsum("knm,kn...->km...")``), then
``W' ← rescale ⊙ W'`` row-wise. ``ΔW = W' − W`` depends on the base weight (:attr:`needs_base`); it is computed in fp32
and :func:`lorakit.placement.bind_layer` turns it into a plain full diff, so fuse rounds once and hook mode adds
``ΔW·x`` (fused == hooked).

Strength ``s`` (lorakit's one contract, ``W + s·ΔW``): ``W' = (I + s(R − I))ᵀ W`` without ``rescale``, i.e. a
straight-line blend between the identity and the rotation (not a rotation by a fraction of the angle). This is
LyCORIS' own ``multiplier`` for every ``s``; ComfyUI agrees at ``s = 0`` and ``s = 1`` but multiplies by the strength
twice (``W + s·[(sR − sI)ᵀW]``, so ``0.5`` gives a quarter of the change), ignores ``rescale`` and uses ``alpha`` itself
(not ``alpha · out``) as the norm bound. With ``rescale``, lorakit blends the whole change:
``W + s(rescale ⊙ RᵀW − W)``; LyCORIS applies the full rescale at any ``s`` (they agree at ``s = 1``).
4-D ``oft_blocks`` are BOFT butterfly factors: :meth:`DiagOFT.from_fields` hands them to :class:`~.boft.BOFT`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..errors import FormatError, ShapeMismatchError, UnsupportedAdapterError
from .base import WeightAdapter, register_adapter

__all__ = ["DiagOFT", "KohyaOFT", "cayley", "kohya_cayley"]


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """fp32 ``R = (I + Q)(I − Q)⁻¹`` per block, ``Q = B − Bᵀ`` scaled to Frobenius norm ``constraint`` when larger."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class DiagOFT(WeightAdapter):
    kind = "oft"
    detect = ("oft_blocks",)
    fields = ("oft_blocks", "rescale", "alpha")
    required = ("oft_blocks",)
    needs_base = True

    oft_blocks: torch.Tensor
    rescale: torch.Tensor | None = None
    #: LyCORIS' constraint per output row (the file's ``alpha``); 0 or ``None``: unconstrained
    alpha: float | None = None

    @classmethod
    def from_fields(cls, tensors: Mapping[str, torch.Tensor], *, name: str = "?") -> WeightAdapter:
        blocks = tensors.get("oft_blocks")
        if isinstance(blocks, torch.Tensor) and blocks.dim() == 4:
            # LyCORIS saves BOFT's butterfly factors [m, n, b, b] under diag-OFT's own key: the shape decides
            from .boft import BOFT

            rest = {f: t for f, t in tensors.items() if f != "oft_blocks"}
            return BOFT.from_fields({**rest, "boft_blocks": blocks}, name=name)
        return super().from_fields(tensors, name=name)

    def validate(self, name: str) -> None:
        super().validate(name)
        if self.oft_blocks.dim() != 3:
            raise FormatError(f"{name}: oft_blocks must be [n, b, b], got {tuple(self.oft_blocks.shape)}")
        k, b, b2 = self.oft_blocks.shape
        if b != b2:
            raise FormatError(f"{name}: oft_blocks must be square blocks [n, b, b], got {tuple(self.oft_blocks.shape)}")
        if self.rescale is not None and self.rescale.numel() != k * b:
            raise FormatError(f"{name}: rescale of shape {tuple(self.rescale.shape)} does not match {k * b} output rows")

    @property
    def scale(self) -> float:
        return 1.0  # alpha is OFT's constraint, not a LoRA scale

    @property
    def constraint(self) -> float:
        """The Frobenius-norm bound on ``Q`` LyCORIS trains with: ``alpha · out`` (0: unconstrained)."""
        return float(self.alpha or 0.0) * self.out_features()

    def out_features(self) -> int:
        return int(self.oft_blocks.shape[0] * self.oft_blocks.shape[1])

    def rotation(self) -> torch.Tensor:
        """fp32 ``R [k, b, b]``."""
        return cayley(self.oft_blocks, self.constraint)

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "an OFT delta is a rotation of the base weight: apply it to a model (lorakit.apply), or merge it into "
            "a base checkpoint, rather than computing it on its own"
        )

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        k, b, _ = self.oft_blocks.shape
        if base.shape[0] != k * b:
            raise ShapeMismatchError(f"OFT blocks {k}x{b}x{b} rotate {k * b} rows, the weight has shape {tuple(base.shape)}")
        w = base.detach().float()
        r = self.rotation().to(w.device)
        rotated = torch.einsum("knm,knc->kmc", r, w.reshape(k, b, -1)).reshape(w.shape)
        if self.rescale is not None:
            rotated = self.rescale.float().to(w.device).reshape(-1, *([1] * (w.dim() - 1))) * rotated
        return rotated - w


def kohya_cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """fp32 ``R`` per block as kohya's sd-scripts ``networks/oft.py`` computes it: ``Q = B − Bᵀ`` is always rescaled
    by ``(min(|Q|, c) + 1e-8) / (|Q| + 1e-8)`` (``c = alpha · out``), so ``alpha = 0`` gives ``R ≈ I``; a bound that
    does not bind leaves ``Q`` exactly as it is (the ratio is ``x / x = 1``)."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    norm = torch.linalg.vector_norm(q)
    q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class KohyaOFT(WeightAdapter):
    """kohya sd-scripts' own OFT (``networks.oft``): keys ``oft_unet_<module>.oft_blocks [k, b, b]`` and
    ``.alpha`` (the constraint, always applied: see :func:`kohya_cayley`). The rotation is diag-OFT's
    (``W'ₖ = Rₖᵀ Wₖ``, no rescale) and kohya's multiplier is the same straight-line blend ``I + s(R − I)``, so
    strength ``s`` here is exactly sd-scripts' ``multiplier``. A reader selects this type (canonical field
    ``kohya_oft_blocks``) by the ``oft_unet_`` prefix or the ``ss_network_module=networks.oft`` metadata."""

    kind = "oft_kohya"
    detect = ("kohya_oft_blocks",)
    fields = ("kohya_oft_blocks", "alpha")
    required = ("kohya_oft_blocks",)
    needs_base = True
    #: sd-scripts saves OFT under its own prefix (``OFT_PREFIX_UNET``); the kohya writer keeps it
    kohya_prefix = "oft_unet_"

    kohya_oft_blocks: torch.Tensor
    alpha: float | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        shape = tuple(self.kohya_oft_blocks.shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise FormatError(f"{name}: kohya OFT oft_blocks must be [num_blocks, b, b], got {shape}")

    @property
    def scale(self) -> float:
        return 1.0  # alpha is the constraint, not a LoRA scale

    @property
    def constraint(self) -> float:
        """kohya's bound on ``|Q|``: ``alpha · out`` (``alpha = 0`` bounds it to 0: no rotation)."""
        return float(self.alpha or 0.0) * self.out_features()

    def out_features(self) -> int:
        return int(self.kohya_oft_blocks.shape[0] * self.kohya_oft_blocks.shape[1])

    def rotation(self) -> torch.Tensor:
        """fp32 ``R [k, b, b]``."""
        return kohya_cayley(self.kohya_oft_blocks, self.constraint)

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "an OFT delta is a rotation of the base weight: apply it to a model (lorakit.apply), or merge it into "
            "a base checkpoint, rather than computing it on its own"
        )

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        k, b, _ = self.kohya_oft_blocks.shape
        if base.dim() < 2 or base.shape[0] != k * b:
            raise ShapeMismatchError(f"OFT blocks {k}x{b}x{b} rotate {k * b} rows, the weight has shape {tuple(base.shape)}")
        w = base.detach().float()
        r = self.rotation().to(w.device)
        return torch.einsum("knm,knc->kmc", r, w.reshape(k, b, -1)).reshape(w.shape) - w
