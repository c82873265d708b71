"""Compose several LoRAs into one equal to their weighted sum ``Σ sᵢ ΔWᵢ``: exact rank concatenation with
strengths and alphas baked into ``up`` (alpha = new rank), or refactorised to ``--rank`` with per-layer error.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import torch

from ..adapters import FullDiff, LoRAWeights, LowRank, WeightAdapter
from ..errors import InternalError, ShapeMismatchError, UnsupportedAdapterError
from ..families import Resolver
from ..formats.conventions import kohya_name
from ..io import check_output
from ..model import Layer, LoRA
from ..placement import WHOLE, weight_delta
from .common import (
    UNSET,
    Checkpoint,
    OpResult,
    Progress,
    Record,
    checkpoint_resolver,
    load_lora,
    module_tensors,
    save_lora,
)
from .svd import factorise, factorise_product, fro_norm, product_norm

__all__ = ["ComposeInput", "ComposeLayerStat", "ComposeSummary", "clamp_factors", "compose"]

_QUANTILE_SAMPLE = 1 << 22  # torch.quantile refuses > 2^24 elements (kohya #1485): estimate on a sample
_STAT_KIND = {"full": "diff", "norm": "w_norm"}  # the file spelling of a dense delta type

#: ``(base checkpoint, its resolver)``: where DoRA layers find the base weight they depend on
_BaseIndex = tuple[Checkpoint, Resolver]


@dataclasses.dataclass(frozen=True)
class ComposeLayerStat(Record):
    """One composed layer: how many inputs had it and how its weight was built (``method``: ``concat``,
    ``concat+clamp``, ``qr-svd``, ``dense`` or ``dense-svd``); the weight fields are unset without a weight."""

    layer: str
    inputs: int
    kind: str = UNSET
    rank: int = UNSET
    rel_error: float = UNSET
    energy: float = UNSET
    method: str = UNSET


@dataclasses.dataclass(frozen=True)
class ComposeInput(Record):
    lora: str | None
    strength: float
    layers: int


@dataclasses.dataclass(frozen=True)
class ComposeSummary(Record):
    inputs: list[ComposeInput]
    layers: int
    exact: bool
    max_rel_error: float
    mean_rel_error: float


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya-style outlier clamp, opt-in: clip both factors to the ``q`` quantile of ``|x|`` (symmetric,
    unlike kohya's signed quantile)."""
    values = torch.cat([up.flatten(), down.flatten()]).abs().float()
    if values.numel() > _QUANTILE_SAMPLE:
        gen = torch.Generator().manual_seed(0)
        values = values[torch.randint(values.numel(), (_QUANTILE_SAMPLE,), generator=gen)]
    h = float(torch.quantile(values, q))
    return up.clamp(-h, h), down.clamp(-h, h)


def _kohya_name(layer: Layer) -> str:
    """The in-memory name of a composed layer (the writer spells the file's keys from component and path)."""
    if layer.flat or "." not in layer.name or layer.component is None:
        return layer.name
    return kohya_name(layer.component, layer.path)


def _key(layer: Layer) -> tuple[str | None, str]:
    return layer.component, layer.path.replace(".", "_")


def _trail(shapes: list[tuple[int, ...]], name: str) -> tuple[int, ...]:
    """The common trailing shape of the ``down`` factors (conv ``[in, kh, kw]`` wins over flat ``[in]``)."""
    best = max(shapes, key=len)
    n = math.prod(best)
    for s in shapes:
        if math.prod(s) != n:
            raise ShapeMismatchError(f"{name}: the LoRAs disagree on the layer's input size ({shapes}); they were "
                                     "trained for different models")
    return best


def _compose_layer(items: list[tuple[float, Layer]], rank: int | None, clamp_q: float | None,
                   base_index: _BaseIndex | None) -> tuple[Layer, ComposeLayerStat]:
    """The weighted sum of one layer's inputs (weights, biases and other parameters)."""
    first = items[0][1]
    name = _kohya_name(first)
    stat = ComposeLayerStat(layer=name, inputs=len(items))
    weighted = [(s, la) for s, la in items if la.weight is not None]
    weight = None
    if weighted:
        weight, stat = _compose_weight(name, weighted, rank, clamp_q, base_index, stat)
    biases = [(s, la.delta_bias()) for s, la in items]
    biases = [s * b for s, b in biases if b is not None]
    bias = None if not biases else torch.stack([b.reshape(-1) for b in biases]).sum(0).reshape(biases[0].shape)
    params: dict[str, torch.Tensor] = {}
    for s, la in items:
        for p, t in la.params.items():
            params[p] = params.get(p, 0) + s * t.float()
    layer = Layer(
        name=name, component=first.component, path=first.path, flat=True, weight=weight, bias=bias, params=params,
        bias_key="b_norm" if any(la.bias_key == "b_norm" and la.bias is not None for _, la in items) else "diff_b",
    )
    return layer, stat


def compose(
    loras: Sequence[tuple[str | os.PathLike[str] | LoRA, float]],
    output: str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    clamp_quantile: float | None = None,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> OpResult:
    """One LoRA equal to ``Σ sᵢ ΔWᵢ``. Without ``rank``: exact (LoRA layers concatenated, any other adapter
    type as a full ``diff``). With ``rank``: each layer refactorised to at most ``rank`` (error reported).
    DoRA layers depend on the base weight: pass ``base`` (a checkpoint) to compose them."""
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ValueError(f"clamp_quantile must be in (0, 1], got {clamp_quantile}")
    if output is not None:
        check_output(output, [base, *(src for src, _ in loras if not isinstance(src, LoRA))])
    parsed = [(load_lora(src), float(s)) for src, s in loras]
    groups: dict[tuple[str | None, str], list[tuple[float, Layer]]] = {}
    for lora, s in parsed:
        for layer in lora:
            groups.setdefault(_key(layer), []).append((s, layer))
    base_ckpt = Checkpoint(base) if base is not None else None
    base_index = (base_ckpt, checkpoint_resolver(base_ckpt)) if base_ckpt is not None else None
    layers: dict[str, Layer] = {}
    stats: list[ComposeLayerStat] = []
    for n, items in enumerate(groups.values()):
        if progress:
            progress("compose", n, len(groups))
        layer, stat = _compose_layer(items, rank, clamp_quantile, base_index)
        layers[layer.name] = layer
        stats.append(stat)
    lora = LoRA(layers=layers, metadata={"lorakit_op": "compose"}, format="kohya")
    if output is not None:
        save_lora(lora, output, "kohya", inputs=[src for src, _ in loras if not isinstance(src, LoRA)])
    errs = [s.get("rel_error", 0.0) for s in stats]
    summary = ComposeSummary(
        inputs=[ComposeInput(lo.source, s, len(lo)) for lo, s in parsed],
        layers=len(layers), exact=all(e == 0.0 for e in errs),
        max_rel_error=max(errs, default=0.0), mean_rel_error=sum(errs) / len(errs) if errs else 0.0,
    )
    return OpResult("compose", None if output is None else str(output), summary, stats, lora=lora)


def _compose_weight(
    name: str,
    weighted: list[tuple[float, Layer]],
    rank: int | None,
    clamp_q: float | None,
    base_index: _BaseIndex | None,
    stat: ComposeLayerStat,
) -> tuple[WeightAdapter, ComposeLayerStat]:
    """The summed weight of one layer: factor concatenation when every input is plain low-rank, else dense."""
    factors = [(s, la.weight.low_rank()) for s, la in weighted if la.dora is None]
    if len(factors) == len(weighted) and all(lr is not None for _, lr in factors):
        return _compose_factors(name, factors, rank, clamp_q, stat)
    dense = _dense_sum(name, weighted, base_index)
    if rank is None or dense.dim() < 2:
        # the sum of one dense type stays that type (norm diffs stay norm diffs), anything else a full diff
        types = {type(la.weight) for _, la in weighted}
        composed = (types.pop().from_delta(dense) if len(types) == 1 else None) or FullDiff(dense)
        kind = _STAT_KIND.get(composed.kind, composed.kind)
        return composed, dataclasses.replace(stat, kind=kind, rel_error=0.0, method="dense")
    mat = dense.reshape(dense.shape[0], -1)
    f = factorise(mat, rank=rank)
    up, down, err = f.up, f.down, f.rel_error
    if clamp_q is not None:
        up, down = clamp_factors(up, down, clamp_q)
        err = fro_norm(mat - up @ down) / f.norm if f.norm else 0.0
    stat = dataclasses.replace(stat, kind="lora", rank=f.rank, rel_error=err, energy=f.energy, method="dense-svd")
    return _lora(up, down, tuple(dense.shape[1:])), stat


def _compose_factors(name: str, factors: list[tuple[float, LowRank]], rank: int | None, clamp_q: float | None,
                     stat: ComposeLayerStat) -> tuple[LoRAWeights, ComposeLayerStat]:
    """Concatenated factors (exact), clamped or refactorised to ``rank`` on request."""
    trail = _trail([lr.in_shape for _, lr in factors], name)
    out_dims = {int(lr.up.shape[0]) for _, lr in factors}
    if len(out_dims) != 1:
        raise ShapeMismatchError(f"{name}: the LoRAs disagree on the layer's output size {sorted(out_dims)}")
    # Strength and alpha/r go into up once each (kohya's merge scales both factors: s² effect).
    downs = torch.cat([lr.down.float() for _, lr in factors], 0)
    ups = torch.cat([lr.up.float() * (s * lr.scale) for s, lr in factors], 1)
    total = downs.shape[0]
    if rank is None or total <= rank:
        if clamp_q is None:
            return _lora(ups, downs, trail), dataclasses.replace(stat, kind="lora", rank=total, rel_error=0.0,
                                                                 method="concat")
        up, down = clamp_factors(ups, downs, clamp_q)
        norm = product_norm(ups, downs)
        err = product_norm(torch.cat([ups, up], 1), torch.cat([downs, -down], 0)) / norm if norm else 0.0
        stat = dataclasses.replace(stat, kind="lora", rank=total, rel_error=err, method="concat+clamp")
        return _lora(up, down, trail), stat
    f = factorise_product(ups, downs, rank=rank)
    up, down, err = f.up, f.down, f.rel_error
    if clamp_q is not None:
        up, down = clamp_factors(up, down, clamp_q)
        err = product_norm(torch.cat([ups, up], 1), torch.cat([downs, -down], 0)) / f.norm
    stat = dataclasses.replace(stat, kind="lora", rank=f.rank, rel_error=err, energy=f.energy, method="qr-svd")
    return _lora(up, down, trail), stat


def _dense_sum(name: str, weighted: list[tuple[float, Layer]], base_index: _BaseIndex | None) -> torch.Tensor:
    """``Σ sᵢ ΔWᵢ`` as one dense tensor (DoRA deltas read their base weight from ``base_index``)."""
    dense = None
    for s, la in weighted:
        if la.dora is not None:
            d = _dora_delta(la, base_index)
        else:
            d = la.weight.natural_delta()
        if dense is not None and d.numel() != dense.numel():
            raise ShapeMismatchError(f"{name}: deltas of shapes {tuple(dense.shape)} and {tuple(d.shape)} do not add up")
        if dense is not None and d.dim() > dense.dim():
            dense = dense.reshape(d.shape)
        dense = s * d if dense is None else dense + s * d.reshape(dense.shape)
    if dense is None:
        raise InternalError(f"{name}: no weighted input to sum")
    return dense


def _dora_delta(la: Layer, base_index: _BaseIndex | None) -> torch.Tensor:
    if base_index is None:
        raise UnsupportedAdapterError(f"{la.name}: a DoRA delta depends on the base weight; pass base=<checkpoint> "
                                      "(CLI: --base) to compose it")
    ckpt, resolver = base_index
    hit = resolver.direct(la)
    info = None if hit is None else module_tensors(ckpt, resolver, hit[0]).get("weight")
    if info is None:
        raise ShapeMismatchError(f"{la.name}: no weight for this DoRA layer in {ckpt.path}")
    return weight_delta(la, WHOLE, ckpt.read(info))


def _lora(up: torch.Tensor, down: torch.Tensor, trail: tuple[int, ...]) -> LoRAWeights:
    r = down.shape[0]
    down = down.reshape(r, *trail)
    up = up.reshape(up.shape[0], r, *([1] * (len(trail) - 1)))
    return LoRAWeights(down=down.contiguous(), up=up.contiguous(), alpha=float(r))
