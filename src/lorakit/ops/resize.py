"""Change the rank of a LoRA optimally: QR of ``downᵀ`` and ``up`` + SVD of the small core for plain LoRA,
the full delta for Tucker/LoHa/LoKr/full; fixed rank, retained energy or a measured error bound.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..adapters import LoRAWeights
from ..io import check_not_input
from ..model import LoRA
from .common import OpResult, Progress, load_lora, save_lora
from .svd import factorise, factorise_product

__all__ = ["resize"]


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
    if output is not None and not isinstance(source, LoRA):
        check_not_input(output, [source])
    lora = load_lora(source)
    adaptive = energy is not None or max_error is not None
    layers = {}
    stats = []
    for n, layer in enumerate(lora):
        if progress:
            progress("resize", n, len(lora))
        w = layer.weight
        if w is None:
            layers[layer.name] = layer
            continue
        stat = {"layer": layer.name, "kind": w.kind, "old_rank": w.rank}
        lr = w.low_rank()
        if lr is not None:
            if not adaptive and rank >= lr.rank:
                stat.update(new_rank=lr.rank, energy=1.0, rel_error=0.0)
                layers[layer.name] = layer
                stats.append(stat)
                continue
            trail = lr.in_shape
            f = factorise_product(lr.up.float() * lr.scale, lr.down.float(), rank=rank, energy=energy,
                                  max_error=max_error)
        else:
            # Tucker / LoHa / LoKr / full diff: the delta itself is the thing to approximate.
            delta = w.natural_delta()
            if delta.dim() < 2:  # a 1-D diff (norm weight in a LightX2V file) has no rank: keep it
                layers[layer.name] = layer
                continue
            trail = tuple(delta.shape[1:])
            f = factorise(delta.reshape(delta.shape[0], -1), rank=rank, energy=energy, max_error=max_error)
        if not adaptive and f.rank:
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
        stat.update(new_rank=k, energy=f.energy, rel_error=f.rel_error, bound_met=f.bound_met)
        layers[layer.name] = dataclasses.replace(layer, weight=new)
        stats.append(stat)
    out = dataclasses.replace(lora, layers=layers, metadata={**lora.metadata, "lorakit_op": "resize"})
    if output is not None:
        fmt = "peft" if lora.format.startswith("peft") and not any(la.flat for la in lora) else "kohya"
        save_lora(out, output, fmt, inputs=[] if isinstance(source, LoRA) else [source])
    energies = [s["energy"] for s in stats]
    errs = [s["rel_error"] for s in stats]
    summary = {
        "layers": len(stats), "total_rank_before": sum(s["old_rank"] or 0 for s in stats),
        "total_rank_after": sum(s["new_rank"] for s in stats),
        "mean_energy": sum(energies) / len(energies) if energies else 1.0, "min_energy": min(energies, default=1.0),
        "max_rel_error": max(errs, default=0.0), "parameters_before": lora.parameters(), "parameters_after": out.parameters(),
    }
    result = OpResult("resize", None if output is None else str(output), summary, stats, lora=out)
    return result
