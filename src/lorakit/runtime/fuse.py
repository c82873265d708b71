"""Delta pieces of a layer for one target (rows, transforms, DoRA) and the transactional in-place fuse:
``W ← round_once(W_fp32 + Σ sᵢ ΔWᵢ)``; the original tensors are kept so that removal is bit-exact.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapters import LoRAWeights
from ..adapters.base import reshape_delta
from ..errors import NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from ..families import Target
from ..model import Layer

__all__ = [
    "Contribution", "bias_delta", "fuse", "fused_base", "get_param", "low_rank_factors", "needs_fused_base",
    "param_deltas", "row_piece", "weight_delta",
]

TRANSFORMS = ("swap_scale_shift",)


def row_piece(delta: torch.Tensor, target: Target) -> torch.Tensor:
    """Rows ``src_rows`` of a layer's delta, then the target's row transform."""
    if target.src_rows is not None:
        a, b = target.src_rows
        if b > delta.shape[0]:
            raise ShapeMismatchError(f"rows {a}:{b} requested from a delta with {delta.shape[0]} rows")
        delta = delta[a:b]
    if target.transform is None:
        return delta
    if target.transform == "swap_scale_shift":
        # the file stores (shift, scale), the model (scale, shift): swap the two halves of the rows
        half = delta.shape[0] // 2
        return torch.cat([delta[half:], delta[:half]], dim=0)
    raise UnsupportedAdapterError(f"unknown row transform {target.transform!r}; known: {', '.join(TRANSFORMS)}")


def get_param(module: nn.Module, name: str) -> nn.Parameter | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _dst_view(param: torch.Tensor, target: Target) -> torch.Tensor:
    if target.dst_rows is None:
        return param
    a, b = target.dst_rows
    if b > param.shape[0]:
        raise ShapeMismatchError(f"rows {a}:{b} of a tensor of shape {tuple(param.shape)}")
    return param[a:b]


def _split_lora(layer: Layer, target: Target) -> LoRAWeights | None:
    # A plain LoRA split by rows is exactly the LoRA with the rows of `up` taken: no full delta needed.
    w = layer.weight
    if isinstance(w, LoRAWeights) and target.src_rows is not None and target.transform is None:
        a, b = target.src_rows
        if b <= w.up.shape[0]:
            up_bias = None if w.up_bias is None else w.up_bias[a:b]
            return dataclasses.replace(w, up=w.up[a:b], up_bias=up_bias)
    return None


def needs_fused_base(layer: Layer, targets: list[Target]) -> bool:
    """DoRA normalises the whole fused weight: a split/transformed DoRA layer needs it rebuilt first."""
    return layer.dora is not None and any(t.src_rows is not None or t.transform is not None for t in targets)


def fused_base(layer: Layer, targets: list[Target], weights: list[torch.Tensor]) -> torch.Tensor:
    """The weight the file's (fused) layer was trained on, rebuilt in the file's row order from the model's
    split modules: each target's rows (after undoing its row transform) at its ``src_rows``. The targets must
    tile the rows ``0:n`` exactly; a DoRA norm over a partial weight would be silently wrong."""
    pieces = []
    for t, w in zip(targets, weights):
        rows = _dst_view(w, t).detach().float()
        if t.transform is not None:
            rows = row_piece(rows, dataclasses.replace(t, src_rows=None))  # swap_scale_shift is its own inverse
        start, stop = t.src_rows if t.src_rows is not None else (0, rows.shape[0])
        if stop - start != rows.shape[0]:
            raise ShapeMismatchError(f"{layer.name}: rows {start}:{stop} of the file layer do not fit {t.module} "
                                     f"({rows.shape[0]} rows)")
        pieces.append((start, stop, rows))
    pieces.sort(key=lambda p: p[0])
    expected = 0
    for start, stop, _ in pieces:
        if start != expected:
            raise UnsupportedAdapterError(
                f"{layer.name}: a DoRA layer over a fused projection needs every part of it in the model "
                f"(rows {expected}:{start} have no module); convert the file to the model's own layout first"
            )
        expected = stop
    return torch.cat([p[2] for p in pieces], dim=0)


def weight_delta(layer: Layer, target: Target, weight: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 delta (strength 1) for the rows of ``weight`` this target covers, shaped like them. ``base``: the
    rebuilt fused weight (:func:`fused_base`) for a DoRA layer split over several modules."""
    if layer.weight is None:
        return None
    dst = _dst_view(weight, target)
    shape = tuple(dst.shape)
    if layer.dora is not None:
        if target.src_rows is not None or target.transform is not None:
            if base is None:
                raise UnsupportedAdapterError(
                    f"{layer.name}: a DoRA layer split over several modules needs the fused base weight "
                    "(runtime.fuse.fused_base)"
                )
            full = layer.delta_weight(base=base)  # DoRA on the whole fused weight, in the file's row order
            return reshape_delta(row_piece(full, target), shape, layer.weight.kind)
        return layer.delta_weight(base=dst.detach())
    split = _split_lora(layer, target)
    if split is not None:
        return split.delta_weight(shape)
    full = layer.weight.natural_delta()
    if target.src_rows is None and target.transform is None:
        return reshape_delta(full, shape, layer.weight.kind)
    rest = shape[1:]
    rows = full.numel() // max(1, _numel(rest))
    if rows * _numel(rest) != full.numel():
        raise ShapeMismatchError(f"{layer.weight.kind} delta of shape {tuple(full.shape)} has no rows of shape {rest}")
    return reshape_delta(row_piece(full.reshape(rows, *rest), target), shape, layer.weight.kind)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bias_delta(layer: Layer, target: Target) -> torch.Tensor | None:
    delta = layer.delta_bias()
    return None if delta is None else row_piece(delta.float(), target)


def param_deltas(layer: Layer, target: Target) -> dict[str, torch.Tensor]:
    """Extra parameter deltas (``modulation`` ...), renamed through ``target.param_map``."""
    renames = dict(target.param_map)
    return {renames.get(name, name): t.float() for name, t in layer.params.items()}


@dataclasses.dataclass
class Contribution:
    """One LoRA's delta onto (rows of) one parameter: ``param[dst_rows] += strength · delta``. A plain
    low-rank delta is kept as ``factors=(up, down, scale)`` and added with one ``addmm_`` at fuse time, so
    no full-size ΔW is materialised per layer (memory and time: ~2 passes over W instead of ~6)."""

    lora: int
    layer: str
    delta: torch.Tensor | None  # fp32, shaped like the target rows
    dst_rows: tuple[int, int] | None
    factors: tuple[torch.Tensor, torch.Tensor, float] | None = None


def low_rank_factors(layer: Layer, target: Target, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(up [rows, r], down [r, cols], scale)`` when ΔW rows = up @ down exactly (Linear, or 1x1 LoRA on
    any conv whose kernel is 1x1 too), else ``None`` (then the delta is materialised)."""
    w = layer.weight
    if layer.dora is not None or target.transform is not None or not isinstance(w, LoRAWeights) or w.mid is not None:
        return None
    if any(k != 1 for k in w.up.shape[2:]):
        return None
    lr = _split_lora(layer, target) if target.src_rows is not None else w
    if lr is None:
        return None
    down = lr.down.flatten(1)
    dst = _dst_view(weight, target)
    if lr.up.shape[0] != dst.shape[0] or down.shape[1] != dst[0].numel():
        raise ShapeMismatchError(
            f"{layer.name}: LoRA up {tuple(lr.up.shape)} / down {tuple(lr.down.shape)} does not fit a weight of shape "
            f"{tuple(dst.shape)}" + (f" (rows {target.dst_rows} of {target.module})" if target.dst_rows else "")
        )
    if lr.down.dim() > 2 and tuple(lr.down.shape[2:]) != tuple(dst.shape[2:]) and dst.dim() > 2:
        return None  # e.g. a 3x3 down on a 1x1 conv: let reshape_delta decide
    return lr.up.flatten(1), down, lr.scale


def fuse(plan: dict[int, tuple[nn.Parameter, list[Contribution]]], strengths: list[float]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Compute every new tensor first (fp32, rounded once), check it, then swap all in.

    Returns ``(parameter, original tensor)`` backups. The original tensor object itself is kept (same
    device, no copy): the new value is a fresh tensor put in ``param.data``, so restoring is putting the
    very same storage back. Extra memory: one copy of each touched tensor while the patch is active.
    """
    staged: list[tuple[nn.Parameter, torch.Tensor]] = []
    for param, contribs in plan.values():
        live = [c for c in contribs if strengths[c.lora] != 0.0]
        if not live:
            continue  # strength 0 everywhere: leave the tensor itself in place (bit-exact identity)
        original = param.data
        # fp32 accumulation (float64 weights keep float64); always a fresh tensor, never the original
        acc = torch.float64 if original.dtype == torch.float64 else torch.float32
        total = original.detach().to(acc, copy=True)
        for c in live:
            view = total if c.dst_rows is None else total[c.dst_rows[0] : c.dst_rows[1]]
            if c.factors is not None:
                up, down, scale = c.factors
                dev = total.device
                # rows of a contiguous tensor are contiguous: the 2-D view writes straight into `total`
                view.view(view.shape[0], -1).addmm_(up.to(dev, total.dtype), down.to(dev, total.dtype),
                                                     alpha=strengths[c.lora] * scale)
                continue
            assert c.delta is not None
            delta = c.delta.to(device=total.device)
            if delta.shape != view.shape:
                raise ShapeMismatchError(
                    f"{c.layer}: delta of shape {tuple(delta.shape)} does not fit {tuple(view.shape)}"
                )
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
        staged.append((param, new))
    backups: list[tuple[nn.Parameter, torch.Tensor]] = []
    for param, new in staged:
        backups.append((param, param.data))
        param.data = new
    return backups
