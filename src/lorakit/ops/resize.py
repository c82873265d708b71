"""Change the rank of a LoRA optimally: QR of ``downᵀ`` and ``up`` + SVD of the small core for plain LoRA,
the full delta for Tucker/LoHa/LoKr/full; fixed rank, retained energy or a measured error bound.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..adapters import LoRAWeights, LowRank, WeightAdapter
from ..io import check_output
from ..model import Layer, LoRA
from .common import UNSET, OpResult, Progress, Record, load_lora, save_lora
from .svd import Factorisation, factorise, factorise_product

__all__ = ["ResizeLayerStat", "ResizeSummary", "resize"]


@dataclasses.dataclass(frozen=True)
class ResizeLayerStat(Record):
    """One resized layer (``old_rank`` None for types without a rank); ``bound_met`` is unset for layers
    that already fit a fixed ``rank`` and were kept as they are."""

    layer: str
    kind: str
    old_rank: int | None
    new_rank: int
    energy: float
    rel_error: float
    bound_met: bool = UNSET


@dataclasses.dataclass(frozen=True)
class ResizeSummary(Record):
    layers: int
    total_rank_before: int
    total_rank_after: int
    mean_energy: float
    min_energy: float
    max_rel_error: float
    parameters_before: int
    parameters_after: int


@dataclasses.dataclass(frozen=True)
class _Target:
    """The rank options of :func:`resize`: a fixed rank, or an adaptive mode capped by ``rank``."""

    rank: int | None
    energy: float | None
    max_error: float | None

    @property
    def adaptive(self) -> bool:
        return self.energy is not None or self.max_error is not None


def _factorise(w: WeightAdapter, lr: LowRank | None, target: _Target) -> tuple[Factorisation, tuple[int, ...]] | None:
    """The new factors of a weight (``lr``: its low-rank form) and the trailing shape of ``down`` (None: a 1-D
    delta, kept as it is)."""
    if lr is not None:
        f = factorise_product(lr.up.float() * lr.scale, lr.down.float(), rank=target.rank, energy=target.energy,
                              max_error=target.max_error)
        return f, lr.in_shape
    # Tucker / LoHa / LoKr / full diff: the delta itself is the thing to approximate.
    delta = w.natural_delta()
    if delta.dim() < 2:  # a 1-D diff (norm weight in a LightX2V file) has no rank: keep it
        return None
    f = factorise(delta.reshape(delta.shape[0], -1), rank=target.rank, energy=target.energy,
                  max_error=target.max_error)
    return f, tuple(delta.shape[1:])


def _resize_layer(layer: Layer, target: _Target) -> tuple[Layer, ResizeLayerStat | None]:
    """The layer at its new rank and its stat (None: nothing to resize, the layer is kept)."""
    w = layer.weight
    if w is None:
        return layer, None
    lr = w.low_rank()
    if lr is not None and not target.adaptive and target.rank >= lr.rank:
        return layer, ResizeLayerStat(layer.name, w.kind, w.rank, lr.rank, energy=1.0, rel_error=0.0)
    found = _factorise(w, lr, target)
    if found is None:
        return layer, None
    f, trail = found
    if not target.adaptive and f.rank:
        # Never pad with zero directions: a Tucker/LoHa delta of lower true rank keeps that rank.
        numerical = int((f.spectrum[: f.rank] > f.spectrum[0] * 1e-6).sum())
        if numerical < f.rank:
            f = f.truncate(numerical)
    k = max(f.rank, 1)
    down = f.down[:k] if f.rank else torch.zeros(1, f.down.shape[1])
    up = f.up[:, :k] if f.rank else torch.zeros(f.up.shape[0], 1)
    # PEFT lora_B.bias was scaled by the old alpha/r; keep its effect under the new scale 1.
    new = LoRAWeights(
        down=down.reshape(k, *trail).contiguous(),
        up=up.reshape(up.shape[0], k, *([1] * (len(trail) - 1))).contiguous(),
        alpha=float(k), up_bias=w.delta_bias(),
    )
    stat = ResizeLayerStat(layer.name, w.kind, w.rank, k, f.energy, f.rel_error, f.bound_met)
    return dataclasses.replace(layer, weight=new), stat


def resize(
    source: str | os.PathLike[str] | LoRA,
    output: str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    progress: Progress | None = None,
) -> OpResult:
    """Resize every low-rank layer to ``rank``, or to the smallest rank keeping ``energy`` of its Σσ² /
    with relative error ``<= max_error`` (``rank`` caps the adaptive modes when also given). DoRA
    magnitudes, biases and norm deltas are kept as they are; output alpha = new rank (scale 1)."""
    if rank is None and energy is None and max_error is None:
        raise ValueError("pass rank, energy or max_error")
    if energy is not None and max_error is not None:
        raise ValueError("pass either energy or max_error, not both")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if output is not None:
        check_output(output, [] if isinstance(source, LoRA) else [source])
    lora = load_lora(source)
    target = _Target(rank, energy, max_error)
    layers = {}
    stats: list[ResizeLayerStat] = []
    for n, layer in enumerate(lora):
        if progress:
            progress("resize", n, len(lora))
        layers[layer.name], stat = _resize_layer(layer, target)
        if stat is not None:
            stats.append(stat)
    out = dataclasses.replace(lora, layers=layers, metadata={**lora.metadata, "lorakit_op": "resize"})
    if output is not None:
        fmt = "peft" if lora.format.startswith("peft") and not any(la.flat for la in lora) else "kohya"
        save_lora(out, output, fmt, inputs=[] if isinstance(source, LoRA) else [source])
    energies = [s.energy for s in stats]
    errs = [s.rel_error for s in stats]
    summary = ResizeSummary(
        layers=len(stats), total_rank_before=sum(s.old_rank or 0 for s in stats),
        total_rank_after=sum(s.new_rank for s in stats),
        mean_energy=sum(energies) / len(energies) if energies else 1.0, min_energy=min(energies, default=1.0),
        max_rel_error=max(errs, default=0.0), parameters_before=lora.parameters(), parameters_after=out.parameters(),
    )
    return OpResult("resize", None if output is None else str(output), summary, stats, lora=out)
