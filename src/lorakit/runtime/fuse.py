"""The transactional in-place fuse: ``W ← round_once(W_fp32 + Σ sᵢ ΔWᵢ)``; the original tensors are kept so
that removal is bit-exact. The deltas themselves come from :mod:`lorakit.placement`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import sys
import threading
import weakref

import torch
from torch import nn

from ..adapters import LowRank
from ..errors import ConcurrentPatchError, InternalError, NonFiniteError, ShapeMismatchError

__all__ = ["Contribution", "FusePlan", "drop_spares", "fuse", "fused_value", "restore", "same_tensor"]

#: elements per chunk of the low-rank kernel: its fp32 scratch (1 MiB) stays in cache between the ops
CHUNK = 1 << 18
# The fused tensors that ``restore`` took off each parameter, reused by the next fuse of that parameter, so a
# switch writes into memory that is already mapped (no page faults, no allocator churn). Weak: a dropped
# model drops its spares. At most one per parameter: the memory a patch held while it was active.
# Keyed by id (tensors compare elementwise, so they cannot be WeakKeyDictionary keys); the weak reference's
# callback drops the entry when the parameter dies, so an id is never reused for a stale spare.
_TARGET = threading.local()  # the parameter being fused by this thread's fuse()
_SPARES: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

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
            _TARGET.param = param  # whose spare the new value may reuse (per thread: fuses on other models run too)
            staged.append((param, source, _fused_tensor(source, live, strengths)))
    _TARGET.param = None
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


def restore(backups: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Put the original tensors back (bit-exact) and keep each fused tensor as that parameter's spare."""
    for param, original in reversed(backups):
        fused = param.data
        param.data = original
        if not _same_tensor(fused, original):
            key = id(param)
            _SPARES[key] = (weakref.ref(param, lambda _, key=key: _SPARES.pop(key, None)), fused)


def drop_spares() -> int:
    """Free the fused tensors kept for reuse by the next fuse; returns the bytes released."""
    freed = sum(t.numel() * t.element_size() for _, t in _SPARES.values())
    _SPARES.clear()
    return freed


def _output_for(param: nn.Parameter | None, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like`` to write the fused value into: the parameter's spare when it fits."""
    entry = None if param is None else _SPARES.pop(id(param), None)
    spare = None if entry is None or entry[0]() is not param else entry[1]
    if spare is not None and spare.shape == like.shape and spare.dtype == like.dtype and spare.device == like.device \
            and spare.is_contiguous() and spare.data_ptr() != like.data_ptr():
        return spare
    return _empty(like)


#: CPU tensors from this size up are allocated with transparent huge pages where the kernel offers them
#: (``madvise`` mode): a fresh fused tensor is written once, and faulting it in 2 MiB pages instead of 4 KiB ones
#: takes ~8x less time (1 GiB: 0.12 s against 0.7-1.0 s on the 2-core test machine). ``LORAKIT_HUGEPAGES=0`` turns
#: it off; other platforms use ``torch.empty``.
HUGE_MIN_BYTES = 4 << 20
_HUGE = (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
         and os.environ.get("LORAKIT_HUGEPAGES", "1") != "0")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like``: on the CPU and large, backed by an anonymous mapping advised
    for huge pages (freed with the tensor, which holds the mapping's buffer); otherwise ``torch.empty``."""
    nbytes = like.numel() * like.element_size()
    if not _HUGE or like.device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return torch.frombuffer(region, dtype=torch.uint8).view(like.dtype).view(like.shape)


def fused_value(original: torch.Tensor, live: list[Contribution], strengths: list[float]) -> torch.Tensor:
    """``round_once(original + Σ sᵢ ΔWᵢ)`` as a new tensor, checked finite (the fuse arithmetic, for hook mode's
    parameter slots); ``original`` is not touched."""
    return _fused_tensor(original, live, strengths)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way."""
    return _same_tensor(a, b)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (``param.data`` is a new object per access)."""
    return (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _fused_tensor(original: torch.Tensor, live: list[Contribution], strengths: list[float]) -> torch.Tensor:
    """``round_once(original + Σ sᵢ ΔWᵢ)`` as a new tensor (``param``'s spare when it has one), checked
    finite; ``original`` is not touched."""
    if original.is_contiguous() and original.dim() >= 2 and original.is_floating_point() \
            and all(c.factors is not None and c.dst_rows is None for c in live):
        return _fused_low_rank(getattr(_TARGET, 'param', None), original, live, strengths)
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


def _may_overflow(dtype: torch.dtype, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> bool:
    """Whether the fused value needs the per-chunk finiteness screen. The factors were checked finite when loaded,
    so ``W + Σ sᵢ upᵢ@downᵢ`` can only leave the finite range by overflow: impossible when the bound
    ``Σ |sᵢ|·rᵢ·max|upᵢ|·max|downᵢ|`` is below a quarter of the dtype's range (W itself would need to be within
    a factor 4/3 of the largest finite value). fp16 (range 65504) is always screened."""
    if dtype == torch.float16:
        return True
    bound = 0.0
    for up, down, alpha in factors:
        bound += abs(alpha) * up.shape[1] * _absmax(up) * _absmax(down)
    return not math.isfinite(bound) or bound > torch.finfo(dtype).max / 4


def _absmax(t: torch.Tensor) -> float:
    """``max |t|`` in one pass without a temporary (NaN propagates)."""
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


def _fused_low_rank(param: nn.Parameter | None, original: torch.Tensor, live: list[Contribution], strengths: list[float]) -> torch.Tensor:
    """The fast path (whole-tensor low-rank contributions): row chunks of ``W + Σ sᵢ·scaleᵢ·upᵢ @ downᵢ``
    computed in fp32 in a cache-sized scratch (fp32 weights: in the output rows) and rounded once into the output,
    so W is read once and the output written once whatever the dtype. Finiteness: the extremes of each unrounded
    chunk where the result could overflow (:func:`_may_overflow`)."""
    w2 = original.view(original.shape[0], -1)
    rows, cols = w2.shape
    acc = torch.float64 if original.dtype == torch.float64 else torch.float32
    dev = original.device
    factors = [(c.factors.up.to(dev, acc), c.factors.down.to(dev, acc), strengths[c.lora] * c.factors.scale) for c in live]
    out = _output_for(param, original)
    o2 = out.view(rows, cols)
    check = _may_overflow(original.dtype, factors)
    direct = original.dtype == acc  # fp32/fp64: the output rows themselves are the scratch
    # Row chunks keep each step in cache: W's rows are read once from memory and the output's written once, the
    # GEMM works on cached rows (one addmm into another tensor is a full copy, then a GEMM over memory: ~5 passes
    # over W's bytes instead of ~3). A GPU gets the whole tensor in one call where it can: per-chunk launches cost more
    whole = direct and not check and dev.type != "cpu"
    step = rows if whole else max(1, CHUNK // max(cols, 1))
    # the screen: each chunk's extremes, taken in the accumulation dtype before rounding (in cache, no
    # conversion): the rounded value can only be non-finite where one lies beyond the output dtype's range
    extremes = torch.empty(((rows + step - 1) // step, 2), dtype=acc, device=dev) if check else None
    scratch = None if direct else torch.empty((min(step, rows), cols), dtype=acc, device=dev)
    for j, r0 in enumerate(range(0, rows, step)):
        r1 = min(r0 + step, rows)
        dst = (o2[r0:r1] if direct else scratch[: r1 - r0]).copy_(w2[r0:r1])
        for up, down, alpha in factors:
            dst.addmm_(up[r0:r1], down, alpha=alpha)
        if extremes is not None:
            torch.aminmax(dst, out=(extremes[j, 0], extremes[j, 1]))
        if not direct:
            o2[r0:r1].copy_(dst)
    if extremes is not None and not bool(extremes.abs().max() <= torch.finfo(original.dtype).max) \
            and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(original).all()):
        names = sorted({c.layer for c in live})
        raise NonFiniteError(
            f"fusing {', '.join(names)} gives NaN/Inf in {original.dtype} (strengths {[strengths[c.lora] for c in live]}); "
            "nothing was changed. Lower the strength or apply with mode='hook'."
        )
    return out
