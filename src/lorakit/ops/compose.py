"""Compose several LoRAs into one equal to their weighted sum ``Σ sᵢ ΔWᵢ``: exact rank concatenation with
strengths and alphas baked into ``up`` (alpha = new rank), or refactorised to ``--rank`` with per-layer error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..adapters import FullDiff, LoRAWeights, WeightAdapter
from ..errors import ShapeMismatchError, UnsupportedAdapterError
from ..families import Resolver
from ..formats.conventions import kohya_name
from ..io import check_not_input
from ..model import Layer, LoRA
from ..placement import WHOLE, weight_delta
from .common import Checkpoint, OpResult, Progress, checkpoint_resolver, load_lora, module_tensors, save_lora
from .svd import factorise, factorise_product, fro_norm, product_norm

__all__ = ["clamp_factors", "compose"]

_QUANTILE_SAMPLE = 1 << 22
_STAT_KIND = {"full": "diff", "norm": "w_norm"}  # the file spelling of a dense delta type  # torch.quantile refuses > 2^24 elements (kohya #1485): estimate on a sample


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
    n = 1
    for s in best:
        n *= s
    for s in shapes:
        m = 1
        for x in s:
            m *= x
        if m != n:
            raise ShapeMismatchError(f"{name}: the LoRAs disagree on the layer's input size ({shapes}); they were "
                                     "trained for different models")
    return best


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
        check_not_input(output, [src for src, _ in loras if not isinstance(src, LoRA)])
    parsed = [(load_lora(src), float(s)) for src, s in loras]
    groups: dict[tuple[str | None, str], list[tuple[float, Layer]]] = {}
    for lora, s in parsed:
        for layer in lora:
            groups.setdefault(_key(layer), []).append((s, layer))
    base_ckpt = Checkpoint(base) if base is not None else None
    base_index = (base_ckpt, checkpoint_resolver(base_ckpt)) if base_ckpt is not None else None
    layers: dict[str, Layer] = {}
    stats: list[dict] = []
    for n, items in enumerate(groups.values()):
        if progress:
            progress("compose", n, len(groups))
        first = items[0][1]
        name = _kohya_name(first)
        stat: dict = {"layer": name, "inputs": len(items)}
        weighted = [(s, la) for s, la in items if la.weight is not None]
        weight = None
        if weighted:
            weight = _compose_weight(name, weighted, rank, clamp_quantile, base_index, stat)
        biases = [(s, la.delta_bias()) for s, la in items]
        biases = [s * b for s, b in biases if b is not None]
        bias = None if not biases else torch.stack([b.reshape(-1) for b in biases]).sum(0).reshape(biases[0].shape)
        params: dict[str, torch.Tensor] = {}
        for s, la in items:
            for p, t in la.params.items():
                params[p] = params.get(p, 0) + s * t.float()
        layers[name] = Layer(
            name=name, component=first.component, path=first.path, flat=True, weight=weight, bias=bias, params=params,
            bias_key="b_norm" if any(la.bias_key == "b_norm" and la.bias is not None for _, la in items) else "diff_b",
        )
        stats.append(stat)
    lora = LoRA(layers=layers, metadata={"lorakit_op": "compose"}, format="kohya")
    if output is not None:
        save_lora(lora, output, "kohya", inputs=[src for src, _ in loras if not isinstance(src, LoRA)])
    errs = [s.get("rel_error", 0.0) for s in stats]
    summary = {
        "inputs": [{"lora": lo.source, "strength": s, "layers": len(lo)} for lo, s in parsed],
        "layers": len(layers), "exact": all(e == 0.0 for e in errs),
        "max_rel_error": max(errs, default=0.0), "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
    }
    result = OpResult("compose", None if output is None else str(output), summary, stats, lora=lora)
    return result


def _compose_weight(
    name: str,
    weighted: list[tuple[float, Layer]],
    rank: int | None,
    clamp_q: float | None,
    base_index: tuple[Checkpoint, Resolver] | None,
    stat: dict,
) -> WeightAdapter:
    factors = [(s, la.weight.low_rank()) for s, la in weighted if la.dora is None]
    if len(factors) == len(weighted) and all(lr is not None for _, lr in factors):
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
                stat.update(kind="lora", rank=total, rel_error=0.0, method="concat")
                return _lora(ups, downs, trail)
            up, down = clamp_factors(ups, downs, clamp_q)
            norm = product_norm(ups, downs)
            err = product_norm(torch.cat([ups, up], 1), torch.cat([downs, -down], 0)) / norm if norm else 0.0
            stat.update(kind="lora", rank=total, rel_error=err, method="concat+clamp")
            return _lora(up, down, trail)
        f = factorise_product(ups, downs, rank=rank)
        up, down, err = f.up, f.down, f.rel_error
        if clamp_q is not None:
            up, down = clamp_factors(up, down, clamp_q)
            err = product_norm(torch.cat([ups, up], 1), torch.cat([downs, -down], 0)) / f.norm
        stat.update(kind="lora", rank=f.rank, rel_error=err, energy=f.energy, method="qr-svd")
        return _lora(up, down, trail)
    dense = None
    for s, la in weighted:
        if la.dora is not None:
            if base_index is None:
                raise UnsupportedAdapterError(f"{la.name}: a DoRA delta depends on the base weight; pass base=<checkpoint> "
                                              "(CLI: --base) to compose it")
            ckpt, resolver = base_index
            hit = resolver.direct(la)
            info = None if hit is None else module_tensors(ckpt, resolver, hit[0]).get("weight")
            if info is None:
                raise ShapeMismatchError(f"{la.name}: no weight for this DoRA layer in {ckpt.path}")
            w = ckpt.read(info)
            d = weight_delta(la, WHOLE, w)
        else:
            d = la.weight.natural_delta()
        if dense is not None and d.numel() != dense.numel():
            raise ShapeMismatchError(f"{name}: deltas of shapes {tuple(dense.shape)} and {tuple(d.shape)} do not add up")
        if dense is not None and d.dim() > dense.dim():
            dense = dense.reshape(d.shape)
        dense = s * d if dense is None else dense + s * d.reshape(dense.shape)
    if rank is None or dense.dim() < 2:
        # the sum of one dense type stays that type (norm diffs stay norm diffs), anything else a full diff
        types = {type(la.weight) for _, la in weighted}
        composed = (types.pop().from_delta(dense) if len(types) == 1 else None) or FullDiff(dense)
        stat.update(kind=_STAT_KIND.get(composed.kind, composed.kind), rel_error=0.0, method="dense")
        return composed
    mat = dense.reshape(dense.shape[0], -1)
    f = factorise(mat, rank=rank)
    up, down, err = f.up, f.down, f.rel_error
    if clamp_q is not None:
        up, down = clamp_factors(up, down, clamp_q)
        err = fro_norm(mat - up @ down) / f.norm if f.norm else 0.0
    stat.update(kind="lora", rank=f.rank, rel_error=err, energy=f.energy, method="dense-svd")
    return _lora(up, down, tuple(dense.shape[1:]))


def _lora(up: torch.Tensor, down: torch.Tensor, trail: tuple[int, ...]) -> LoRAWeights:
    r = down.shape[0]
    down = down.reshape(r, *trail)
    up = up.reshape(up.shape[0], r, *([1] * (len(trail) - 1)))
    return LoRAWeights(down=down.contiguous(), up=up.contiguous(), alpha=float(r))
