"""Adapters whose delta depends on the live weight (OFT, (IA)³, GLoRA, PEFT ``modules_to_save``) bound to it, and
transformers ``Conv1D`` targets (GPT-2 style, weight stored ``[in, out]``: PEFT ``fan_in_fan_out``).

:func:`bind_layer` turns a base-dependent layer into a plain full diff against the target's current weight
(computed in fp32 from the base, in the file's row order for split targets), so fuse, hooks and every other
consumer only ever see ``W' = W + s·ΔW``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..adapters import FullDiff
from ..errors import ShapeMismatchError
from ..families.base import Target
from ..model import Layer
from .delta import dst_view, fused_base, get_param, weight_delta

__all__ = ["bind_layer", "is_transposed", "oriented_weight", "transposed_delta"]


def is_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[in, out]``."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def oriented_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's weight as ``[out, in, ...]`` (a transposed view for a ``Conv1D``), or ``None``."""
    w = get_param(module, "weight")
    if w is None:
        return None
    return w.t() if is_transposed(module) else w


def transposed_delta(layer: Layer, target: Target, weight: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """fp32 ΔW for a ``Conv1D`` weight (``[in, out]``): the delta computed in ``[out, in]`` form, transposed."""
    if target.dst_rows is not None:
        raise ShapeMismatchError(f"{target.module}: row pieces of a transposed (Conv1D) weight are not supported")
    delta = weight_delta(layer, target, weight.t(), base)
    return delta.t().contiguous()


def bind_layer(layer: Layer, targets: list[Target], module_of: Callable[[Target], nn.Module]) -> Layer:
    """``layer`` with a base-dependent adapter replaced by its fp32 full diff against the targets' weights
    (the layer itself otherwise). Raises :class:`ShapeMismatchError` when a target has no fitting weight."""
    adapter = layer.weight
    if adapter is None or not adapter.needs_base:
        return layer
    weights = []
    for t in targets:
        w = oriented_weight(module_of(t))
        if w is None:
            raise ShapeMismatchError(f"{t.module} has no weight for the {adapter.kind} delta")
        weights.append(w.detach())
    whole = len(targets) == 1 and targets[0].src_rows is None and targets[0].transform is None
    base = dst_view(weights[0], targets[0]) if whole else fused_base(layer, targets, weights)
    if base.device.type == "meta":
        raise ShapeMismatchError(f"{layer.name}: the {adapter.kind} delta needs the real weight (the model is on meta)")
    delta = adapter.delta_from_base(base)
    bias = layer.bias
    if whole:
        extra = adapter.bias_from_base(get_param(module_of(targets[0]), "bias"))
        if extra is not None:
            bias = extra if bias is None else bias.float() + extra
    return dataclasses.replace(layer, weight=FullDiff(delta), bias=bias)
