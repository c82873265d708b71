"""Rewrite a LoRA into a model's own module layout (offline, exact): every layer resolved by the model's alias
index is renamed to the module it lands on, and a layer on a fused projection (BFL ``img_attn.qkv``, SD3
``x_block.attn.qkv``) becomes one layer per split module.

Exactness: a plain LoRA splits as (shared ``down``, rows of ``up``); a row transform (``swap_scale_shift``)
permutes ``up``'s rows. Other adapter types on a split (LoHa, LoKr, full diffs) become the exact rows of
their full delta (a ``diff``). DoRA on a split needs the base weights and is refused here (apply or merge it
against the real weights instead).
"""

from __future__ import annotations

import dataclasses
import functools

from ..adapters import FullDiff, WeightAdapter
from ..errors import UnsupportedAdapterError
from ..families.base import Target
from ..families.resolve import Resolver
from ..formats.conventions import PEFT_PREFIX, PEFT_TRANSFORMER
from ..model import Layer, LoRA
from .delta import row_piece

__all__ = ["to_model_layout"]


def _split_weight(layer: Layer, target: Target) -> WeightAdapter | None:
    w = layer.weight
    if w is None:
        return None
    if target.src_rows is None and target.transform is None:
        return w
    if layer.dora is not None:
        raise UnsupportedAdapterError(
            f"{layer.name}: a DoRA layer on a fused projection can only be split against the base weights; "
            "apply it to the model (lorakit.apply) or merge it into the checkpoint instead of converting"
        )
    # a row transform permutes rows: an adapter that can pick rows (a LoRA's ``up``) takes it exactly as well
    sliced = w.slice_rows(functools.partial(row_piece, target=target))
    if sliced is not None:
        return sliced
    full = w.natural_delta()
    return FullDiff(diff=row_piece(full, target).contiguous())


def _moved(layer: Layer, target: Target, denoiser_prefix: str) -> Layer:
    if target.dst_rows is not None:
        raise UnsupportedAdapterError(
            f"{layer.name}: lands on rows {target.dst_rows} of {target.module} (a fused module of the model); "
            "a LoRA file cannot address part of a module — merge it into the checkpoint instead"
        )
    renames = dict(target.param_map)
    bias = None if layer.bias is None else row_piece(layer.bias, target)
    known = target.component in PEFT_PREFIX
    prefix = denoiser_prefix if target.component == "denoiser" else (PEFT_PREFIX[target.component] if known else "")
    return dataclasses.replace(
        layer,
        name=prefix + target.module,
        component=target.component if known else layer.component,
        path=target.module,
        flat=False,
        weight=_split_weight(layer, target),
        bias=bias,
        params={renames.get(k, k): v for k, v in layer.params.items()},
    )


def to_model_layout(
    lora: LoRA, resolver: Resolver, *, denoiser_prefix: str = PEFT_TRANSFORMER
) -> tuple[LoRA, list[str]]:
    """``(LoRA in the model's module names, names of the layers that matched nothing and were kept as-is)``.
    ``resolver``: a :class:`lorakit.families.Resolver` over the model (or its meta-device copy)."""
    layers: dict[str, Layer] = {}
    unmatched: list[str] = []
    for layer in lora:
        targets = resolver.lookup(layer)
        if not targets:
            unmatched.append(layer.name)
            layers[layer.name] = layer
            continue
        for target in targets:
            moved = _moved(layer, target, denoiser_prefix)
            if moved.name in layers:
                raise UnsupportedAdapterError(
                    f"{layer.name} and another layer both land on {moved.name}; merge them into one LoRA first "
                    "(lorakit compose)"
                )
            layers[moved.name] = moved
    return dataclasses.replace(lora, layers=layers), unmatched
