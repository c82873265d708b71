"""Rewrite a LoRA that is in a model's own (diffusers) module layout into the layout kohya's trainers write:
the family's original names (:class:`lorakit.families.kohya_names.KohyaNames`), with the projections the original
model fuses put back together (FLUX.1 ``img_attn.qkv`` / ``linear1``, SD3 ``attn.qkv``). The inverse of
:func:`lorakit.placement.layout.to_model_layout`.

Exactness: low-rank parts fuse as sd-scripts' ``convert_flux_lora.py`` does, ``down`` = the parts' downs stacked
along the rank, ``up`` = block-diagonal (each part's ``up`` on its own rows and rank columns), so
``ΔW_fused[rows_i] = ΔW_i`` exactly. Parts whose ``alpha / rank`` differ get the ratio folded into their ``up``
(relative to the first part's), and ``alpha = ratio * fused rank``, so one consistent alpha is written. Missing
parts (a LoRA on ``to_q/to_k/to_v`` but not ``proj_mlp``) are zero rows. Parts that are not low rank (LoHa, LoKr,
full diffs) fuse as the exact rows of one full ``diff``. DoRA cannot be fused without the base weights and is
refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..adapters import FullDiff, LoRAWeights, WeightAdapter
from ..errors import ShapeMismatchError, UnsupportedAdapterError
from ..families.base import RowTransform, Target
from ..families.kohya_names import KohyaNames, KohyaSlot
from ..formats.conventions import kohya_name
from ..model import Layer, LoRA

__all__ = ["to_kohya_layout"]

Flat = Callable[[str, str], str]


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _unplaced(t: torch.Tensor, target: Target) -> torch.Tensor:
    """The inverse of the target's row transform (``swap_scale_shift`` is its own inverse)."""
    return _swap(t) if target.transform == RowTransform.SWAP_SCALE_SHIFT else t


def _renamed(layer: Layer, slot: KohyaSlot, name: str) -> Layer:
    """A one-module slot: the original name, the row transform undone, the parameter names given back."""
    target = slot.parts[0]
    w = layer.weight
    if w is not None and target.transform is not None:
        if layer.dora is not None:
            raise UnsupportedAdapterError(f"{layer.name}: a DoRA layer with permuted rows ({target.transform}) "
                                          "cannot be written in original names; save with format='peft'")
        w = w.slice_rows(lambda t: _unplaced(t, target)) or FullDiff(diff=_unplaced(w.natural_delta(), target))
    inverse = {b: a for a, b in target.param_map}
    return dataclasses.replace(
        layer, name=name, component=slot.component, path=slot.name, flat=False, weight=w,
        bias=None if layer.bias is None else _unplaced(layer.bias, target),
        params={inverse.get(k, k): v for k, v in layer.params.items()},
    )


Rows = dict[str, tuple[int, int]]


def _out_rows(layer: Layer) -> int | None:
    if layer.weight is not None:
        return layer.weight.out_features()
    bias = layer.delta_bias()
    return None if bias is None else int(bias.shape[0])


def _part_rows(slot: KohyaSlot, parts: dict[str, Layer]) -> Rows:
    """Each part's rows in the fused weight: the LoRA's own sizes for the parts it has, the model's for the parts
    it lacks (zero rows), which needs the LoRA to fit the model where it has parts."""
    rows: Rows = {}
    start, misfit = 0, None
    for t in slot.parts:
        size = t.src_rows[1] - t.src_rows[0]
        own = _out_rows(parts[t.module]) if t.module in parts else None
        if own is not None and own != size:
            misfit = misfit or (t.module, own, size)
            size = own
        rows[t.module] = (start, start + size)
        start += size
    missing = [t.module for t in slot.parts if t.module not in parts]
    if misfit and missing:
        module, own, size = misfit
        raise ShapeMismatchError(
            f"{module}: the LoRA has {own} output rows where the model has {size}, and it has no layer on "
            f"{', '.join(missing)}, so the size of those rows of {slot.name} is unknown; pass the model the LoRA "
            "was trained for (convert --model DIR|tiny-<family>|variant, save(model=...))"
        )
    return rows


def _fused_weight(slot: KohyaSlot, parts: dict[str, Layer], rows: Rows) -> WeightAdapter | None:
    weights = {m: ly.weight for m, ly in parts.items() if ly.weight is not None}
    if not weights:
        return None
    factors = {m: w.low_rank() for m, w in weights.items()}
    if all(f is not None for f in factors.values()) and len({f.in_shape for f in factors.values()}) == 1:
        return _block_diagonal(slot, factors, rows)
    total = max(b for _, b in rows.values())
    full = None
    for m, w in weights.items():
        delta = _unplaced(w.natural_delta(), slot.part(m))
        if full is None:
            full = torch.zeros((total, *delta.shape[1:]), dtype=torch.float32)
        a, b = rows[m]
        full[a:b] = delta
    return FullDiff(diff=full.to(next(iter(weights.values())).dtype))


def _block_diagonal(slot: KohyaSlot, factors: dict, rows: Rows) -> LoRAWeights:
    ordered = sorted(factors.items(), key=lambda item: rows[item[0]][0])
    ref = ordered[0][1].scale
    dtype = ordered[0][1].down.dtype
    rank = sum(f.rank for _, f in ordered)
    in_shape = ordered[0][1].in_shape
    up = torch.zeros((max(b for _, b in rows.values()), rank), dtype=dtype)
    downs, col = [], 0
    for m, f in ordered:
        u = _unplaced(f.up, slot.part(m))
        if f.scale != ref:  # fold this part's alpha/rank into its up, relative to the written one
            u = u.float() * (f.scale / ref)
        a, b = rows[m]
        up[a:b, col:col + f.rank] = u.to(dtype)
        downs.append(f.down.to(dtype))
        col += f.rank
    down = torch.cat(downs, dim=0)
    if len(in_shape) > 1:  # a conv: down [R, in, kh, kw], up [out, R, 1, 1]
        down = down.reshape(rank, *in_shape)
        up = up.reshape(*up.shape, *([1] * (len(in_shape) - 1)))
    return LoRAWeights(down=down.contiguous(), up=up, alpha=ref * rank)


def _fused_bias(slot: KohyaSlot, parts: dict[str, Layer], rows: Rows) -> torch.Tensor | None:
    biases = {m: ly.delta_bias() for m, ly in parts.items()}
    biases = {m: b for m, b in biases.items() if b is not None}
    if not biases:
        return None
    out = torch.zeros(max(b for _, b in rows.values()), dtype=torch.float32)
    for m, bias in biases.items():
        a, b = rows[m]
        out[a:b] = _unplaced(bias, slot.part(m))
    dtype = next(ly.bias.dtype if ly.bias is not None else ly.weight.dtype for ly in parts.values()
                 if ly.bias is not None or ly.weight is not None)
    return out.to(dtype)


def _fused(slot: KohyaSlot, parts: dict[str, Layer], name: str) -> Layer:
    for layer in parts.values():
        if layer.dora is not None or layer.params:
            what = "DoRA" if layer.dora is not None else ", ".join(layer.params)
            raise UnsupportedAdapterError(
                f"{layer.name}: {what} on {layer.path} cannot be fused into {slot.name} (the original model's fused "
                "projection) without the base weights; save with format='peft', or apply/merge it instead"
            )
    rows = _part_rows(slot, parts)
    weight = _fused_weight(slot, parts, rows)
    bias = _fused_bias(slot, parts, rows)
    keys = tuple(k for layer in parts.values() for k in layer.keys)
    first = next(iter(parts.values()))
    return dataclasses.replace(first, name=name, component=slot.component, path=slot.name, flat=False,
                               weight=weight, bias=bias, dora=None, params={}, keys=keys, bias_key="diff_b")


def _text_encoder(layer: Layer, components: Mapping[str, nn.Module]) -> tuple[str, str]:
    """``(component, path)`` as kohya writes a layer that keeps its module name: CLIP text encoders from
    ``text_model.`` (transformers 5's CLIPTextModel has no such level), and a T5 that a FLUX pipeline holds as
    ``text_encoder_2`` as kohya's third encoder (``lora_te3_``; the reader maps it back)."""
    comp, path = layer.component or "", layer.path
    module = components.get(comp)
    kind = type(module).__name__
    if kind.startswith("CLIPText") and not path.startswith("text_model.") and not hasattr(module, "text_model"):
        path = "text_model." + path
    if comp == "text_encoder_2" and kind.startswith(("T5", "UMT5")) and "text_encoder_3" not in components:
        comp = "text_encoder_3"
    return comp, path


def to_kohya_layout(lora: LoRA, names: KohyaNames, components: Mapping[str, nn.Module]) -> LoRA:
    """``lora`` (every layer named by a module of ``components``, as :func:`to_model_layout` leaves it) in kohya's
    layout: each layer's ``path`` an original (or diffusers) module path, its ``name`` the kohya key it is written
    under, fused projections fused."""
    layers: dict[str, Layer] = {}
    groups: dict[str, tuple[KohyaSlot, dict[str, Layer]]] = {}
    for layer in lora:
        comp = layer.component
        slot = None if comp is None or layer.flat else names.slot(comp, layer.path)
        if slot is None:
            if comp is not None and not layer.flat:
                comp, path = _text_encoder(layer, components)
                layer = dataclasses.replace(layer, name=kohya_name(comp, path), component=comp, path=path)
            moved = layer
        elif slot.fused:
            groups.setdefault(slot.name, (slot, {}))[1][layer.path] = layer
            continue
        else:
            moved = _renamed(layer, slot, kohya_name(slot.component, slot.name))
        _put(layers, moved)
    for slot, parts in groups.values():
        _put(layers, _fused(slot, parts, kohya_name(slot.component, slot.name)))
    return dataclasses.replace(lora, layers=layers)


def _put(layers: dict[str, Layer], layer: Layer) -> None:
    if layer.name in layers:
        raise UnsupportedAdapterError(
            f"two layers of the LoRA land on {layer.name}; merge them into one LoRA first (lorakit compose)"
        )
    layers[layer.name] = layer
