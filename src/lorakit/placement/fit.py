"""Whether a resolved layer fits its target's shapes, without computing any delta (works on meta modules)."""

from __future__ import annotations

import math

from torch import nn

from ..families.base import Target
from ..model import Layer
from .bind import oriented_weight
from .delta import dst_view, get_param

__all__ = ["fit_problem"]


def fit_problem(layer: Layer, target: Target, module: nn.Module) -> str | None:
    """Why ``layer`` does not fit ``target`` on ``module`` (expected vs actual shape), or ``None`` when it does."""
    adapter = layer.weight
    if adapter is not None:
        w = oriented_weight(module)
        if w is None:
            return f"{target.module} has no weight for the {adapter.kind} delta"
        rows = dst_view(w, target).shape if target.dst_rows is None or target.dst_rows[1] <= w.shape[0] else None
        if rows is None:
            return f"rows {target.dst_rows} of {target.module}.weight {tuple(w.shape)} do not exist"
        out = adapter.out_features()
        n_rows = out
        if target.src_rows is not None:
            if target.src_rows[1] > out:
                return f"rows {target.src_rows} requested from a {adapter.kind} delta with {out} rows"
            n_rows = target.src_rows[1] - target.src_rows[0]
        per_row = adapter.delta_numel() // max(1, out)
        want = math.prod(rows[1:])
        if n_rows != rows[0] or per_row != want:
            return (f"{adapter.kind} delta of {out}x{per_row} (rows x row size) does not fit {target.module}.weight "
                    f"{tuple(w.shape)}" + (f" rows {target.dst_rows}" if target.dst_rows else ""))
    if layer.bias is not None:
        b = get_param(module, "bias")
        n = layer.bias.numel() if target.src_rows is None else target.src_rows[1] - target.src_rows[0]
        want = None if b is None else (b.numel() if target.dst_rows is None else target.dst_rows[1] - target.dst_rows[0])
        if want != n:
            return f"{layer.bias_key} of {n} values does not fit {target.module}.bias ({want or 'none'})"
    for name, t in layer.params.items():
        p = get_param(module, dict(target.param_map).get(name, name))
        if p is None or p.numel() != t.numel():
            return f"{name} delta of shape {tuple(t.shape)} does not fit {target.module} ({None if p is None else tuple(p.shape)})"
    return None
