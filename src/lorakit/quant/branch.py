"""``apply_branch``: LoRAs on a low-rank-branch model (``lorakit quantize --lowrank``) by appending their factors to
each layer's 16-bit branch: exact (no requantization), composed by concatenation, removed bit for bit.

Prefer ``lorakit.apply(..., mode="branch")``: the same route, on the runtime's per-model patch stack and lock (so it
interleaves with fuse and hook patches), with live ``set_strengths``. :func:`apply_branch` is the standalone form;
its :class:`BranchPatch` is not on that stack: remove it before applying or removing other patches on the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import MatchError, ShapeMismatchError
from ..families import Resolver, components_of
from ..model import LoRA
from ..placement import low_rank_factors
from .lowrank import BranchStaged, branch_commit, branch_stage

__all__ = ["BranchPatch", "apply_branch"]


class BranchPatch:
    """LoRAs appended to low-rank branches. ``report``: per layer ``old_rank``/``new_rank``; ``remove()`` puts the
    original branch tensors back (same objects: bit-exact, old ranks). A context manager."""

    def __init__(self, staged: list[BranchStaged], undos: list[Callable[[], None]], report: dict[str, Any]) -> None:
        self.mode = "branch"
        self.report = report
        self._undos = undos
        self.removed = False

    def remove(self) -> None:
        for undo in reversed(self._undos):
            undo()
        self._undos.clear()
        self.removed = True

    def __enter__(self) -> BranchPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _items(loras: Any) -> list[tuple[LoRA, float]]:
    if isinstance(loras, (str, os.PathLike, LoRA)) or (isinstance(loras, tuple) and len(loras) == 2
                                                       and isinstance(loras[1], (int, float))):
        loras = [loras]
    out = []
    for item in loras:
        src, strength = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(src, LoRA):
            from ..formats import load

            src = load(src)
        out.append((src, float(strength)))
    return out


def apply_branch(target: object, loras: Any, *, strict: bool = False, component: str | None = None) -> BranchPatch:
    """Append each LoRA's ``strength · scale · up`` and ``down`` to the branch of every low-rank-branch layer it
    matches. Every layer is computed and checked before any is changed: on error the model is unchanged."""
    items = _items(loras)
    components: dict[str, nn.Module] = components_of(target, component)
    resolver = Resolver(components)
    per_module: dict[int, tuple[str, nn.Module, list[Any]]] = {}
    matched: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for i, (lora, _) in enumerate(items):
        res = resolver.resolve(lora)
        unmatched += [f"{i}: {layer.name}" for layer in res.unmatched]
        for layer, targets in res.matched:
            for t in targets:
                module = resolver.module(t)
                weight = getattr(module, "weight", None)
                if weight is None:
                    raise ShapeMismatchError(f"{t.module} has no weight for {layer.name}")
                factors = low_rank_factors(layer, t, weight)
                per_module.setdefault(id(module), (str(t.ref), module, []))[2].append((i, factors, t.dst_rows))
                matched.setdefault(layer.name, []).append(str(t.ref))
    if not matched:
        raise MatchError(f"no layer of the LoRA(s) matched a module of the {type(target).__name__}")
    if strict and unmatched:
        raise MatchError("strict=True and nothing was applied; unmatched: " + ", ".join(unmatched))
    staged = branch_stage(list(per_module.values()), [s for _, s in items])
    undos = branch_commit(staged)
    report = {"mode": "branch", "matched": matched, "unmatched": unmatched,
              "quant": {s.name: {"library": "lorakit", "old_rank": s.old_rank, "new_rank": s.new_rank}
                        for s in staged}}
    return BranchPatch(staged, undos, report)
