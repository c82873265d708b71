"""Placement: the delta of a LoRA layer on one resolved target (rows of fused projections, row transforms,
weight/bias/parameter deltas, exact low-rank factors, the fused base for DoRA) and the rewrite of a LoRA into a
model's own module layout. Sits above :mod:`lorakit.families` (names) and below runtime, ops and the tools.
"""

from .bind import bind_layer, is_transposed, oriented_weight, transposed_delta
from .delta import (
    WHOLE,
    bias_delta,
    dst_view,
    fused_base,
    get_param,
    low_rank_factors,
    needs_fused_base,
    param_deltas,
    row_piece,
    rows_adapter,
    split_rows,
    weight_delta,
)
from .fit import fit_problem
from .layout import to_model_layout

__all__ = [
    "WHOLE",
    "bias_delta",
    "bind_layer",
    "dst_view",
    "fit_problem",
    "fused_base",
    "get_param",
    "is_transposed",
    "low_rank_factors",
    "needs_fused_base",
    "oriented_weight",
    "param_deltas",
    "row_piece",
    "rows_adapter",
    "split_rows",
    "to_model_layout",
    "transposed_delta",
    "weight_delta",
]
