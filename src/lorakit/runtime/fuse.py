"""The transactional in-place fuse: ``W ← round_once(W_fp32 + Σ sᵢ ΔWᵢ)``; the original tensors are kept so
that removal is bit-exact. The deltas themselves come from :mod:`lorakit.placement`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapters import LowRank
from ..errors import ConcurrentPatchError, InternalError, NonFiniteError, ShapeMismatchError

__all__ = ["Contribution", "FusePlan", "fuse"]

@dataclasses.dataclass
class Contribution:
    """One LoRA's delta onto (rows of) one parameter: ``param[dst_rows] += strength · delta``. A plain
    low-rank delta is kept as ``factors`` and added with one ``addmm_`` at fuse time, so no full-size ΔW is
    materialised per layer (memory and time: ~2 passes over W instead of ~6)."""

    lora: int
    layer: str
    delta: torch.Tensor | None  # fp32, shaped like the target rows
    dst_rows: tuple[int, int] | None
    factors: LowRank | None = None
    #: the quantized module whose weight this lands on (:mod:`lorakit.quant` requantizes it), else ``None``
    owner: nn.Module | None = None


#: ``id(parameter) -> (parameter, its contributions)``, in the order the parameters were first planned
FusePlan = dict[int, tuple[nn.Parameter, list[Contribution]]]


def fuse(plan: FusePlan, strengths: list[float], *, owner: str = "the model") -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Compute every new tensor first (fp32, rounded once), check it, then swap all in.

    Returns ``(parameter, original tensor)`` backups. The original tensor object itself is kept (same
    device, no copy): the new value is a fresh tensor put in ``param.data``, so restoring is putting the
    very same storage back. Extra memory: one copy of each touched tensor while the patch is active.

    The backup is the very tensor each new value was computed from. If any parameter no longer holds it at
    swap time (something else swapped its data meanwhile), :class:`ConcurrentPatchError` naming ``owner``
    is raised before anything is swapped: the model is left as it is.
    """
    staged: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
    for param, contribs in plan.values():
        live = [c for c in contribs if strengths[c.lora] != 0.0]
        if live:  # strength 0 everywhere: leave the tensor itself in place (bit-exact identity)
            source = param.data
            staged.append((param, source, _fused_tensor(source, live, strengths)))
    for param, source, _ in staged:
        if not _same_tensor(param.data, source):
            layers = sorted({c.layer for c in plan[id(param)][1]})
            raise ConcurrentPatchError(
                f"{owner}: the weight patched by {', '.join(layers)} was replaced while this patch was being "
                "computed (another thread or library changed the model); nothing was changed. Patches on one "
                "model must not run concurrently: apply again once the other change is done."
            )
    backups: list[tuple[nn.Parameter, torch.Tensor]] = []
    for param, source, new in staged:
        backups.append((param, source))
        param.data = new
    return backups


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (``param.data`` is a new object per access)."""
    return (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _fused_tensor(original: torch.Tensor, live: list[Contribution], strengths: list[float]) -> torch.Tensor:
    """``round_once(original + Σ sᵢ ΔWᵢ)`` as a fresh tensor, checked finite; ``original`` is not touched."""
    # fp32 accumulation (float64 weights keep float64); always a fresh tensor, never the original
    acc = torch.float64 if original.dtype == torch.float64 else torch.float32
    total = original.detach().to(acc, copy=True)
    for c in live:
        view = total if c.dst_rows is None else total[c.dst_rows[0] : c.dst_rows[1]]
        if c.factors is not None:
            f, dev = c.factors, total.device
            # rows of a contiguous tensor are contiguous: the 2-D view writes straight into `total`
            view.view(view.shape[0], -1).addmm_(f.up.to(dev, total.dtype), f.down.to(dev, total.dtype),
                                                 alpha=strengths[c.lora] * f.scale)
            continue
        if c.delta is None:
            raise InternalError(f"{c.layer}: a contribution with neither a delta nor factors")
        delta = c.delta.to(device=total.device)
        if delta.shape != view.shape:
            raise ShapeMismatchError(f"{c.layer}: delta of shape {tuple(delta.shape)} does not fit {tuple(view.shape)}")
        view.add_(delta, alpha=strengths[c.lora])
    new = total.to(original.dtype)
    # one fp32-accumulated sum is a cheap finiteness screen (NaN/Inf propagate); only when it fails
    # is the exact (and slower) element check run, which also rules out a mere overflow of the sum
    if (
        not bool(torch.isfinite(torch.sum(new, dtype=torch.float32)))
        and not bool(torch.isfinite(new).all())
        and bool(torch.isfinite(original).all())
    ):
        names = sorted({c.layer for c in live})
        raise NonFiniteError(
            f"fusing {', '.join(names)} gives NaN/Inf in {original.dtype} (strengths {[strengths[c.lora] for c in live]}); "
            "nothing was changed. Lower the strength or apply with mode='hook'."
        )
    return new
