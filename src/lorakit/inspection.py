"""``lorakit.inspect`` (module ``lorakit.inspection``): a JSON-ready summary of a LoRA file: format,
adapter types, ranks, alphas, dtypes, parameters, components, target kinds, metadata, unloaded keys.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model import LoRA

__all__ = ["inspect", "module_kind"]

# Module-name fragments -> a kind, checked in order (first match wins).
_KINDS = (
    (("attn", "attention", "to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj", "qkv",
      "self_attn", "cross_attn", "img_attn", "txt_attn", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), "attention"),
    (("mlp", "ff", "ffn", "fc1", "fc2", "linear1", "linear2", "proj_mlp", "img_mlp", "txt_mlp"), "mlp"),
    (("norm", "ln_", "layer_norm"), "norm"),
    (("mod", "adaln", "emb", "embed", "time", "label", "guidance", "vector_in", "modulation"), "embedding/modulation"),
    (("conv", "proj_in", "proj_out", "downsample", "upsample", "skip", "op"), "conv/projection"),
)


def module_kind(path: str) -> str:
    parts = [p for p in path.replace(".", "_").lower().split("_") if p]
    joined = "_" + "_".join(parts) + "_"
    for fragments, kind in _KINDS:
        if any(f"_{frag}_" in joined or joined.startswith(f"_{frag}") for frag in fragments):
            return kind
        if any(p.startswith(frag) and frag in ("attn", "mlp", "conv", "norm") for p in parts for frag in fragments):
            return kind
    return "other"


def inspect(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoRA, *, model: Any = None) -> dict[str, Any]:
    """Summarise a LoRA. ``model`` (a module, pipeline or family name) adds matching coverage."""
    from .formats import load

    lora = load(source)
    ranks = lora.ranks()
    alphas = Counter(
        (layer.weight.alpha if layer.weight.alpha is not None else None) for layer in lora if layer.weight is not None
    )
    size = None
    if lora.source and Path(lora.source).exists():
        size = Path(lora.source).stat().st_size
    from .families import detect_family

    family = detect_family(lora)
    info: dict[str, Any] = {
        "source": lora.source,
        "format": lora.format,
        "family": family,
        "adapter_types": lora.adapter_types(),
        "layers": len(lora),
        "ranks": ranks,
        "rank_min": min(ranks.values()) if ranks else None,
        "rank_max": max(ranks.values()) if ranks else None,
        "alphas": {("none" if k is None else _num(k)): v for k, v in sorted(alphas.items(), key=lambda kv: str(kv[0]))},
        "dtypes": lora.dtypes(),
        "parameters": lora.parameters(),
        "file_size": size,
        "components": {str(k): v for k, v in lora.components().items()},
        "target_kinds": dict(sorted(Counter(module_kind(layer.path) for layer in lora).items())),
        "metadata": dict(lora.metadata),
        "keys": sum(len(layer.keys) for layer in lora) + len(lora.report.problems()),
        "report": lora.report.to_dict(),
    }
    if model is not None:
        info["coverage"] = _coverage(lora, model)
    return info


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _coverage(lora: LoRA, model: Any) -> dict[str, Any]:
    """Matched / unmatched file layers and untouched weighted modules (per component) of ``model``."""
    from .runtime.resolve import Resolver, components_of

    if isinstance(model, str):
        from .families.offline import meta_components

        # only the components the file has (building a meta T5 for a UNet-only LoRA costs seconds)
        wanted = tuple({layer.component or "denoiser" for layer in lora} | {"denoiser"})
        comps = meta_components(model, wanted)
    else:
        comps = components_of(model)
    resolver = Resolver(comps)
    res = resolver.resolve(lora)
    touched = {(t.component, t.module) for _, targets in res.matched for t in targets}
    untouched: dict[str, int] = {}
    weighted: dict[str, int] = {}
    for comp, mods in resolver.index.modules.items():
        names = [n for n, m in mods.items() if n and isinstance(getattr(m, "weight", None), torch.Tensor)]
        weighted[comp] = len(names)
        untouched[comp] = sum((comp, n) not in touched for n in names)
    return {
        "matched": len(res.matched),
        "unmatched": sorted(layer.name for layer in res.unmatched),
        "touched_modules": len(touched),
        "weighted_modules": weighted,
        "untouched_modules": sum(untouched.values()),
        "untouched_by_component": untouched,
        "families": list(resolver.index.families),
    }
