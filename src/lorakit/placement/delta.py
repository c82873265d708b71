"""The delta of one LoRA layer on one target: the rows of a fused projection it covers (``src_rows``), the rows of
the module it lands on (``dst_rows``), row transforms, weight/bias/parameter deltas, the exact low-rank factor
form, and the rebuilt fused base weight a split DoRA layer is normalised on.

Used by every consumer of a placed layer: runtime fuse and hooks, merge, validate, compose and layout. Adapters
serve it through their optional ``low_rank()`` / ``slice_rows()``; nothing here switches on the adapter type.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from ..adapters import FullDiff, LowRank, WeightAdapter
from ..adapters.base import reshape_delta
from ..errors import ShapeMismatchError, UnsupportedAdapterError
from ..families.base import RowTransform, Target
from ..model import Layer

__all__ = [
    "WHOLE", "bias_delta", "dst_view", "fused_base", "get_param", "low_rank_factors", "needs_fused_base",
    "param_deltas", "row_piece", "rows_adapter", "split_rows", "weight_delta",
]

#: the target of an unrouted layer: the whole of one module, no rows, no transform
WHOLE = Target("", "")


def row_piece(delta: torch.Tensor, target: Target) -> torch.Tensor:
    """Rows ``src_rows`` of a layer's delta, then the target's row transform."""
    if target.src_rows is not None:
        a, b = target.src_rows
        if b > delta.shape[0]:
            raise ShapeMismatchError(f"rows {a}:{b} requested from a delta with {delta.shape[0]} rows")
        delta = delta[a:b]
    if target.transform is None:
        return delta
    if target.transform == RowTransform.SWAP_SCALE_SHIFT:
        # the file stores (shift, scale), the model (scale, shift): swap the two halves of the rows
        half = delta.shape[0] // 2
        return torch.cat([delta[half:], delta[:half]], dim=0)
    raise UnsupportedAdapterError(f"unknown row transform {target.transform!r}")  # pragma: no cover - enum


def get_param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def dst_view(param: torch.Tensor, target: Target) -> torch.Tensor:
    """The rows of ``param`` the target lands on (all of it without ``dst_rows``)."""
    if target.dst_rows is None:
        return param
    a, b = target.dst_rows
    if b > param.shape[0]:
        raise ShapeMismatchError(f"rows {a}:{b} of a tensor of shape {tuple(param.shape)}")
    return param[a:b]


def split_rows(adapter: WeightAdapter, target: Target) -> WeightAdapter | None:
    """``adapter`` cut to the target's ``src_rows`` without materialising ΔW (e.g. a LoRA: the rows of ``up``),
    or ``None`` when its type cannot, or the target has no rows, or a row transform is involved."""
    if target.src_rows is None or target.transform is not None:
        return None
    a, b = target.src_rows
    if b > adapter.out_features():
        return None
    return adapter.slice_rows(functools.partial(row_piece, target=Target("", "", src_rows=(a, b))))


def needs_fused_base(layer: Layer, targets: list[Target]) -> bool:
    """DoRA normalises the whole fused weight: a split/transformed DoRA layer needs it rebuilt first."""
    return layer.dora is not None and any(t.src_rows is not None or t.transform is not None for t in targets)


def fused_base(layer: Layer, targets: list[Target], weights: list[torch.Tensor]) -> torch.Tensor:
    """The weight the file's (fused) layer was trained on, rebuilt in the file's row order from the model's
    split modules: each target's rows (after undoing its row transform) at its ``src_rows``. The targets must
    tile the rows ``0:n`` exactly; a DoRA norm over a partial weight would be silently wrong."""
    pieces = []
    for t, w in zip(targets, weights):
        rows = dst_view(w, t).detach().float()
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
    """fp32 delta (strength 1) for the rows of ``weight`` this target covers, shaped like them (:data:`WHOLE`:
    the whole tensor). ``base``: the rebuilt fused weight (:func:`fused_base`) of a DoRA layer split over
    several modules."""
    if layer.weight is None:
        return None
    dst = dst_view(weight, target)
    shape = tuple(dst.shape)
    if layer.weight.needs_base and layer.dora is None:
        # OFT/BOFT/(IA)^3/GLoRA: the delta is a function of this very weight (offline merge; apply binds first)
        if target.src_rows is not None or target.transform is not None:
            raise UnsupportedAdapterError(f"{layer.name}: a {layer.weight.kind} delta on a fused projection that is "
                                          "stored split needs the fused weight; apply it to the loaded model instead")
        return reshape_delta(layer.weight.delta_from_base(dst.detach()), shape, layer.weight.kind)
    if layer.dora is not None:
        if target.src_rows is not None or target.transform is not None:
            if base is None:
                raise UnsupportedAdapterError(
                    f"{layer.name}: a DoRA layer split over several modules needs the fused base weight "
                    "(placement.fused_base)"
                )
            full = layer.delta_weight(base=base)  # DoRA on the whole fused weight, in the file's row order
            return reshape_delta(row_piece(full, target), shape, layer.weight.kind)
        return layer.delta_weight(base=dst.detach())
    split = split_rows(layer.weight, target)
    if split is not None:
        return split.delta_weight(shape)
    full = layer.weight.natural_delta()
    if target.src_rows is None and target.transform is None:
        return reshape_delta(full, shape, layer.weight.kind)
    rest = shape[1:]
    rows = full.numel() // max(1, math.prod(rest))
    if rows * math.prod(rest) != full.numel():
        raise ShapeMismatchError(f"{layer.weight.kind} delta of shape {tuple(full.shape)} has no rows of shape {rest}")
    return reshape_delta(row_piece(full.reshape(rows, *rest), target), shape, layer.weight.kind)


def bias_delta(layer: Layer, target: Target) -> torch.Tensor | None:
    delta = layer.delta_bias()
    return None if delta is None else row_piece(delta.float(), target)


def param_deltas(layer: Layer, target: Target) -> dict[str, torch.Tensor]:
    """Extra parameter deltas (``modulation`` ...), renamed through ``target.param_map``."""
    renames = dict(target.param_map)
    return {renames.get(name, name): t.float() for name, t in layer.params.items()}


def low_rank_factors(layer: Layer, target: Target, weight: torch.Tensor) -> LowRank | None:
    """The target's rows of ΔW as exact factors (Linear, or a 1x1-``up`` LoRA on a conv of the same kernel),
    else ``None`` (then the delta is materialised). Raises when the factors cannot fit the target rows."""
    if layer.dora is not None or target.transform is not None or layer.weight is None:
        return None
    adapter = split_rows(layer.weight, target) if target.src_rows is not None else layer.weight
    lr = None if adapter is None else adapter.low_rank()
    if lr is None:
        return None
    dst = dst_view(weight, target)
    if lr.up.shape[0] != dst.shape[0] or lr.down.shape[1] != dst[0].numel():
        raise ShapeMismatchError(
            f"{layer.name}: LoRA up {tuple(lr.up.shape)} / down {tuple(lr.down.shape)} does not fit a weight of shape "
            f"{tuple(dst.shape)}" + (f" (rows {target.dst_rows} of {target.module})" if target.dst_rows else "")
        )
    kernel = _kernel(adapter)
    if kernel is not None and dst.dim() > 2 and kernel != tuple(dst.shape[2:]):
        return None  # e.g. a 3x3 down on a 1x1 conv: let reshape_delta decide
    return lr


def _kernel(adapter: WeightAdapter) -> tuple[int, ...] | None:
    down = getattr(adapter, "down", None)
    return tuple(down.shape[2:]) if isinstance(down, torch.Tensor) and down.dim() > 2 else None


def rows_adapter(layer: Layer, target: Target, weight: torch.Tensor, base: torch.Tensor | None = None) -> WeightAdapter:
    """The adapter whose ``delta_output`` gives this target's rows of the layer's output: the file's adapter
    (cut to ``src_rows`` when it can be, e.g. a LoRA), else the materialised fp32 delta as a full diff (LoHa,
    LoKr, DoRA, row transforms). Shapes are checked here, before any hook is installed."""
    w = layer.weight
    if w is None:
        raise UnsupportedAdapterError(f"{layer.name}: no weight delta")
    direct = w if target.src_rows is None else split_rows(w, target)
    if direct is not None and layer.dora is None and target.transform is None:
        _check_fits(layer, direct, target, weight)
        return direct
    return FullDiff(weight_delta(layer, target, weight.detach(), base))


def _check_fits(layer: Layer, adapter: WeightAdapter, target: Target, weight: torch.Tensor) -> None:
    rows = dst_view(weight, target)
    if adapter.out_features() != rows.shape[0] or adapter.delta_numel() != rows.numel():
        raise ShapeMismatchError(
            f"{layer.name}: {adapter.kind} of shapes {[tuple(t.shape) for t in adapter.tensors().values()]} does not "
            f"fit {target.module}.weight {tuple(weight.shape)}" + (f" rows {target.dst_rows}" if target.dst_rows else "")
        )
