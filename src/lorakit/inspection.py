"""``lorakit.inspect`` (module ``lorakit.inspection``): a JSON-ready summary of a LoRA file: format,
adapter types, ranks, alphas, dtypes, parameters, components, target kinds, metadata, unloaded keys.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .families import Resolver, components_of, detect_family, family_candidates
from .families.offline import meta_components
from .formats import load
from .model import LoRA
from .placement import fit_problem

__all__ = ["Coverage", "InspectResult", "inspect", "module_kind"]

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


@dataclasses.dataclass(frozen=True)
class Coverage:
    """How a LoRA lands on a model: matched / unmatched file layers and the model's untouched weighted modules."""

    matched: int
    unmatched: list[str]
    touched_modules: int
    weighted_modules: dict[str, int]
    untouched_modules: int
    untouched_by_component: dict[str, int]
    families: list[str]
    #: layers whose name matched but whose shapes do not fit the module: layer -> expected vs actual
    misfits: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


@dataclasses.dataclass(frozen=True)
class InspectResult:
    """What :func:`inspect` found in a LoRA file; :meth:`to_dict` is the JSON form (``lorakit inspect --json``)."""

    source: str | None
    format: str
    family: str | None
    adapter_types: dict[str, int]
    layers: int
    ranks: dict[str, int]
    rank_min: int | None
    rank_max: int | None
    alphas: dict[str | float | int, int]
    dtypes: dict[str, int]
    parameters: int
    file_size: int | None
    components: dict[str, int]
    target_kinds: dict[str, int]
    metadata: dict[str, str]
    keys: int
    report: dict[str, Any]
    #: only when :func:`inspect` was given a model
    coverage: Coverage | None = None
    #: only when detection is unsure (``family`` is ``None``): the best few families with their scores
    #: (:class:`lorakit.families.Candidate` as dicts: name score, and fit on the released models where names tied)
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The summary as a dict of JSON-ready values (``coverage`` only when a model was given)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "coverage"}
        if self.coverage is not None:
            out["coverage"] = self.coverage.to_dict()
        return out

    def __getitem__(self, key: str) -> Any:
        # dict-style access, as when inspect() returned a dict
        return self.to_dict()[key]


def inspect(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoRA, *, model: Any = None) -> InspectResult:
    """Summarise a LoRA. ``model`` (a module, pipeline or family name) adds matching coverage."""
    lora = load(source)
    ranks = lora.ranks()
    alphas = Counter(layer.weight.alpha for layer in lora if layer.weight is not None)
    family = detect_family(lora)
    unsure = [] if family is not None else [c.to_dict() for c in family_candidates(lora)[:_CANDIDATES]]
    size = None
    if lora.source and Path(lora.source).exists():
        size = Path(lora.source).stat().st_size
    return InspectResult(
        source=lora.source,
        format=lora.format,
        family=family,
        adapter_types=lora.adapter_types(),
        layers=len(lora),
        ranks=ranks,
        rank_min=min(ranks.values()) if ranks else None,
        rank_max=max(ranks.values()) if ranks else None,
        # string keys: a file mixing layers with and without alpha must still sort (JSON sort_keys)
        alphas={("none" if k is None else str(_num(k))): v for k, v in sorted(alphas.items(), key=lambda kv: str(kv[0]))},
        dtypes=lora.dtypes(),
        parameters=lora.parameters(),
        file_size=size,
        components={str(k): v for k, v in lora.components().items()},
        target_kinds=dict(sorted(Counter(module_kind(layer.path) for layer in lora).items())),
        metadata=dict(lora.metadata),
        keys=sum(len(layer.keys) for layer in lora) + len(lora.report.problems()),
        report=lora.report.to_dict(),
        coverage=None if model is None else _coverage(lora, model),
        candidates=unsure,
    )


#: how many candidates an unsure detection shows
_CANDIDATES = 3


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _coverage(lora: LoRA, model: Any) -> Coverage:
    """Matched / unmatched file layers and untouched weighted modules (per component) of ``model``."""
    if isinstance(model, str):
        # only the components the file has (building a meta T5 for a UNet-only LoRA costs seconds)
        wanted = tuple({layer.component or "denoiser" for layer in lora} | {"denoiser"})
        comps = meta_components(model, wanted)
    else:
        comps = components_of(model)
    resolver = Resolver(comps)
    res = resolver.resolve(lora)
    misfits: dict[str, str] = {}
    fitting = []
    for layer, targets in res.matched:
        problem = next((p for t in targets if (p := fit_problem(layer, t, resolver.module(t)))), None)
        if problem is None:
            fitting.append((layer, targets))
        else:
            misfits[layer.name] = problem
    touched = {(t.component, t.module) for _, targets in fitting for t in targets}
    untouched: dict[str, int] = {}
    weighted: dict[str, int] = {}
    for comp, mods in resolver.index.modules.items():
        names = [n for n, m in mods.items() if n and isinstance(getattr(m, "weight", None), torch.Tensor)]
        weighted[comp] = len(names)
        untouched[comp] = sum((comp, n) not in touched for n in names)
    return Coverage(
        matched=len(fitting),
        unmatched=sorted(layer.name for layer in res.unmatched),
        touched_modules=len(touched),
        weighted_modules=weighted,
        untouched_modules=sum(untouched.values()),
        untouched_by_component=untouched,
        families=list(resolver.index.families),
        misfits=dict(sorted(misfits.items())),
    )
