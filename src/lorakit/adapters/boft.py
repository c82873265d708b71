"""LyCORIS BOFT (butterfly OFT): ``m`` stages of block-diagonal Cayley rotations, each mixing rows across a wider
butterfly stride, applied to the weight's output rows.

File fields (LyCORIS ``ButterflyOFTModule``): ``oft_blocks [m, n, b, b]`` (``n·b = out``; 4-D, which is how a reader
tells it from diag-OFT's 3-D blocks; canonical field ``boft_blocks``), optional ``rescale [out, 1, …]``, and
``alpha`` (the constraint: 0/absent = unconstrained, else ``Q`` over all stages is scaled down to Frobenius norm
``alpha · out`` when larger, as for diag-OFT). ``Rᵢ = (I + Qᵢ)(I − Qᵢ)⁻¹`` per block.

Stage ``i`` (``k = 2ⁱ · b/2``): group the rows as ``[c, 2, k]``, take them in ``[c, k, 2]`` order, cut that order
into ``n`` blocks of ``b`` rows and left-multiply block ``g`` by ``Rᵢ[g]`` (``R``, not ``Rᵀ`` as diag-OFT), then
put the rows back in their order. ``W' = rescale ⊙ (stage_{m−1} ∘ … ∘ stage_0)(W)``. ``ΔW = W' − W`` depends on
the base weight (:attr:`needs_base`); it is computed in fp32 and :func:`lorakit.placement.bind_layer` turns it into
a plain full diff, so fuse rounds once and hook mode adds ``ΔW·x`` (fused == hooked).

Strength ``s`` (lorakit's one contract, ``W + s·ΔW``): a straight-line blend between ``W`` and the fully rotated
(and rescaled) weight. LyCORIS instead blends every stage (``∏ (I + s(Rᵢ − I))``) and applies ``rescale`` in full
at any ``s``; the two agree at ``s = 0`` and ``s = 1`` always, and at every ``s`` for a single stage without
``rescale``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import FormatError, ShapeMismatchError, UnsupportedAdapterError
from .base import WeightAdapter, register_adapter
from .oft import cayley

__all__ = ["BOFT", "butterfly"]


def _stage_order(rows: int, half_block: int, stage: int, device: torch.device) -> torch.Tensor:
    """Row indices of stage ``stage`` in block order: rows ``[c, 2, k]`` read as ``[c, k, 2]``, ``k = 2^stage·b/2``."""
    k = (2**stage) * half_block
    return torch.arange(rows, device=device).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


def butterfly(rotations: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``(stage_{m−1} ∘ … ∘ stage_0)(weight)`` for fp32 rotations ``[m, n, b, b]`` on rows ``[n·b, …]``."""
    m, n, b, _ = rotations.shape
    out = weight
    for i in range(m):
        order = _stage_order(out.shape[0], b // 2, i, out.device)
        blocks = out[order].reshape(n, b, -1)
        mixed = torch.einsum("gij,gjc->gic", rotations[i], blocks).reshape(out.shape)
        nxt = torch.empty_like(out)
        nxt[order] = mixed
        out = nxt
    return out


@register_adapter
@dataclasses.dataclass(frozen=True, eq=False)
class BOFT(WeightAdapter):
    kind = "boft"
    detect = ("boft_blocks",)
    fields = ("boft_blocks", "rescale", "alpha")
    required = ("boft_blocks",)
    needs_base = True

    boft_blocks: torch.Tensor
    rescale: torch.Tensor | None = None
    #: LyCORIS' constraint per output row (the file's ``alpha``); 0 or ``None``: unconstrained
    alpha: float | None = None

    def validate(self, name: str) -> None:
        super().validate(name)
        shape = tuple(self.boft_blocks.shape)
        if self.boft_blocks.dim() != 4 or shape[2] != shape[3]:
            raise FormatError(f"{name}: BOFT oft_blocks must be [m, n, b, b], got {shape}")
        m, n, b, _ = shape
        if m < 1 or b < 2 or b % 2:
            raise FormatError(f"{name}: BOFT oft_blocks {shape} need m >= 1 stages and an even block size b")
        if m > 1 and n % (2 ** (m - 1)):
            raise FormatError(f"{name}: BOFT oft_blocks {shape}: {m} butterfly stages need n divisible by {2 ** (m - 1)}")
        if self.rescale is not None and self.rescale.numel() != n * b:
            raise FormatError(f"{name}: rescale of shape {tuple(self.rescale.shape)} does not match {n * b} output rows")

    @property
    def scale(self) -> float:
        return 1.0  # alpha is the constraint, not a LoRA scale

    @property
    def stages(self) -> int:
        return int(self.boft_blocks.shape[0])

    @property
    def constraint(self) -> float:
        """The Frobenius-norm bound on all ``Q`` LyCORIS trains with: ``alpha · out`` (0: unconstrained)."""
        return float(self.alpha or 0.0) * self.out_features()

    def out_features(self) -> int:
        return int(self.boft_blocks.shape[1] * self.boft_blocks.shape[2])

    def rotations(self) -> torch.Tensor:
        """fp32 ``R [m, n, b, b]``."""
        return cayley(self.boft_blocks, self.constraint)

    def natural_delta(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            "a BOFT delta is a rotation of the base weight: apply it to a model (lorakit.apply), or merge it into "
            "a base checkpoint, rather than computing it on its own"
        )

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        rows = self.out_features()
        if base.dim() < 2 or base.shape[0] != rows:
            m, n, b, _ = self.boft_blocks.shape
            raise ShapeMismatchError(f"BOFT blocks {m}x{n}x{b}x{b} rotate {rows} rows, the weight has shape "
                                     f"{tuple(base.shape)}")
        w = base.detach().float()
        rotated = butterfly(self.rotations().to(w.device), w.reshape(rows, -1)).reshape(w.shape)
        if self.rescale is not None:
            rotated = self.rescale.float().to(w.device).reshape(-1, *([1] * (w.dim() - 1))) * rotated
        return rotated - w
