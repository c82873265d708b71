"""``apply``: put LoRAs on a live model, fused (``W ← round(W + Σ sᵢ ΔWᵢ)``, originals kept for a bit-exact
``remove()``) or as forward hooks (strengths changeable live); the :class:`Patch` and its :class:`ApplyReport`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import (
    FormatError,
    MatchError,
    NonFiniteError,
    PatchOrderError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from ..families import ModuleRef, Resolver, Target, components_of
from ..model import Layer, LoRA
from ..placement import (
    bias_delta,
    bind_layer,
    fused_base,
    get_param,
    is_transposed,
    low_rank_factors,
    needs_fused_base,
    param_deltas,
    transposed_delta,
    weight_delta,
)
from ..quant import LowRankQuantLinear, QuantOptions
from ..quant import branch_commit as quant_branch_commit
from ..quant import branch_stage as quant_branch_stage
from ..quant import commit as quant_commit
from ..quant import describe as quant_describe
from ..quant import proxy as quant_proxy
from ..quant import register_output_hook as quant_register_output_hook
from ..quant import stage as quant_stage
from ..quant import warn_lossy as quant_warn_lossy
from .checks import refuse_meta
from .fuse import Contribution, FusePlan, fuse, restore
from .hooks import HookState, ParamSlots, make_branch, split_for_hooks, unwrap_tuner

__all__ = ["ApplyReport", "Patch", "PatchOrderError", "apply"]  # PatchOrderError: from lorakit.errors

MODES = ("fuse", "hook", "branch")
# Patches active on each component module, oldest first (weak: a dropped model takes its stack along).
_STACKS: weakref.WeakKeyDictionary[nn.Module, list[Patch]] = weakref.WeakKeyDictionary()
# One lock per component module: apply (planning to commit) and remove on one model run one at a time.
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()  # guards _LOCKS itself (setdefault on a WeakKeyDictionary is not atomic)


@contextlib.contextmanager
def _model_lock(components: dict[str, nn.Module]) -> Iterator[None]:
    """Hold the lock of every component module (taken in a fixed order, so two applies cannot deadlock)."""
    modules = sorted({id(m): m for m in components.values()}.items())
    with _LOCKS_GUARD:
        locks = [_LOCKS.setdefault(m, threading.RLock()) for _, m in modules]
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        yield


@dataclasses.dataclass
class ApplyReport:
    """What an apply did, per LoRA label (``"0:style.safetensors"``): ``matched`` file layer -> target
    module(s) (:class:`~lorakit.families.ModuleRef`, printed ``component:module``), ``unmatched`` file layers, ``shape_mismatches`` layer -> reason
    (skipped), and how many weighted modules of the target no LoRA touched."""

    mode: str = "fuse"
    matched: dict[str, dict[str, list[ModuleRef]]] = dataclasses.field(default_factory=dict)
    unmatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    shape_mismatches: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    #: per LoRA label: broken file keys (NaN/Inf, incomplete, ...) skipped with ``strict=False``, with the reason
    invalid: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    untouched_modules: int = 0
    touched_tensors: int = 0
    families: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: per quantized target module (``component:module``): ``library``, ``scheme``, ``shape`` and, in fuse mode,
    #: ``requant_error`` (relative Frobenius error of the applied delta after requantization)
    quant: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per LoRA: matched / unmatched / shape-mismatched layer counts."""
        labels = list(dict.fromkeys([*self.matched, *self.unmatched, *self.shape_mismatches]))
        return {
            label: {
                "matched": len(self.matched.get(label, {})),
                "unmatched": len(self.unmatched.get(label, [])),
                "shape_mismatches": len(self.shape_mismatches.get(label, {})),
            }
            for label in labels
        }

    def all_unmatched(self) -> list[str]:
        return sorted(f"{label}: {name}" for label, names in self.unmatched.items() for name in names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "counts": self.counts(),
            "matched": self.matched,
            "unmatched": self.unmatched,
            "shape_mismatches": self.shape_mismatches,
            "invalid": self.invalid,
            "untouched_modules": self.untouched_modules,
            "touched_tensors": self.touched_tensors,
            "families": self.families,
            "notes": self.notes,
            "quant": self.quant,
        }

    def summary(self) -> str:
        lines = [
            f"{label}: {c['matched']} layers matched, {c['unmatched']} unmatched, {c['shape_mismatches']} shape mismatches"
            for label, c in self.counts().items()
        ]
        lines.append(f"{self.mode}: {self.touched_tensors} tensors patched, {self.untouched_modules} weighted modules untouched")
        lines.extend(f"{label}: {len(keys)} broken key(s) skipped (strict=False)" for label, keys in self.invalid.items())
        lines.extend(f"note: {n}" for n in self.notes)
        lines.extend(f"quantized {name}: {q['library']} {q['scheme']}"
                     + (f", requant error {q['requant_error']:.3g}" if "requant_error" in q else "")
                     for name, q in self.quant.items())
        return "\n".join(lines)

    __str__ = summary


class Patch:
    """LoRAs applied to a model. ``remove()`` undoes it (bit-exact in fuse mode: the original tensors are
    put back); in hook mode ``set_strengths`` changes the strengths for the next forward. Patches on one
    model stack and must be removed newest first. Usable as a context manager."""

    def __init__(self, mode: str, loras: list[tuple[LoRA, float]], report: ApplyReport, components: dict[str, nn.Module]) -> None:
        self.mode = mode
        self.loras = loras
        self.report = report
        self.components = components
        self._strengths: list[float] = [float(s) for _, s in loras]
        self._backups: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._lora_params = 0
        self.removed = False
        self._undos: list[Any] = []  # quantized layers: put the original quantized objects back
        self._slots = ParamSlots()  # hook mode: parameters re-materialised per strengths (norms, modulation, ...)
        self.quant_options = QuantOptions()
        self._branch: list[tuple[str, nn.Module, list[Any]]] = []  # branch mode: what set_strengths rebuilds
        self._staged: list[Any] = []  # branch mode: the branches now swapped in

    @property
    def strengths(self) -> list[float]:
        return list(self._strengths)

    def set_strengths(self, strengths: Sequence[float]) -> None:
        """New strengths, one per LoRA, used from the next forward (hook mode only). Parameters patched by value
        (norm weights, modulation tables, biases of non-linear modules) are re-materialised now, all computed and
        checked before any changes; a later patch on the same model must be removed first. Branch mode rebuilds the
        appended factors (strength 0 drops a LoRA's factors); a later patch on the model must be removed first."""
        if self.mode == "branch":
            if self.removed:
                raise PatchOrderError("this patch was removed; apply the LoRAs again")
            with _model_lock(self.components):
                self._rebuild_branch([float(s) for s in strengths])
            return
        if self.mode != "hook":
            raise UnsupportedAdapterError(
                "a fused patch has its strengths baked into the weights; remove() and apply again, "
                "or apply with mode='hook' to change strengths live"
            )
        if self.removed:
            raise PatchOrderError("this patch was removed; apply the LoRAs again")
        if len(strengths) != len(self._strengths):
            raise ValueError(f"expected {len(self._strengths)} strengths (one per LoRA), got {len(strengths)}")
        new = [float(s) for s in strengths]
        components = self.components
        with _model_lock(components):
            self._slots.update(new)  # may raise: then neither the parameters nor the strengths changed
            # in place: the hooks hold a reference to this very list
            self._strengths[:] = new

    def _rebuild_branch(self, new: list[float]) -> None:
        if len(new) != len(self._strengths):
            raise ValueError(f"expected {len(self._strengths)} strengths (one per LoRA), got {len(new)}")
        if not all(math.isfinite(s) for s in new):
            raise ValueError(f"strengths must be finite, got {new}")
        self._check_top("change the strengths of")
        old_undos = list(self._undos)
        for undo in reversed(old_undos):  # the original branches back, then the factors appended at the new strengths
            undo()
        try:
            staged = quant_branch_stage(self._branch, new)
        except Exception:
            self._undos = quant_branch_commit(self._staged)  # the same appended tensors as before: nothing changed
            raise
        self._undos = quant_branch_commit(staged)
        self._staged = staged
        self._strengths[:] = new
        for s in staged:
            self.report.quant.setdefault(s.name, {})["new_rank"] = s.new_rank

    def _check_top(self, what: str) -> None:
        for module in self.components.values():
            stack = _STACKS.get(module, [])
            if self in stack and stack[-1] is not self:
                raise PatchOrderError(
                    f"cannot {what} {self!r}: {len(stack) - 1 - stack.index(self)} later patch(es) on the same "
                    "model are still active; remove patches in reverse order of application"
                )

    def param_stats(self) -> dict[str, float]:
        """Total parameters of the patched components, LoRA parameters matched onto them, and the ratio."""
        seen: set[int] = set()
        total = 0
        for module in self.components.values():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return {
            "total_parameters": total,
            "lora_parameters": self._lora_params,
            "ratio": self._lora_params / total if total else 0.0,
        }

    def remove(self) -> None:
        """Undo this patch. Raises :class:`PatchOrderError` if a later patch is still active. Waits for an
        apply or remove running on the same model in another thread (patches on one model are serialised)."""
        with _model_lock(self.components):
            self._remove_locked()

    def _remove_locked(self) -> None:
        if self.removed:
            return
        self._check_top("remove")
        for handle in self._handles:
            handle.remove()
        for undo in reversed(self._undos):
            undo()
        self._undos.clear()
        self._slots.restore()
        restore(self._backups)  # originals back (bit-exact); the fused tensors are kept for the next fuse
        for module in self.components.values():
            stack = _STACKS.get(module, [])
            if stack and stack[-1] is self:
                stack.pop()
        self._backups.clear()
        self._handles.clear()
        self.removed = True

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<Patch mode={self.mode} loras={len(self.loras)} strengths={self._strengths} {state}>"


def _normalise(loras: Any) -> list[tuple[LoRA, float]]:
    single = isinstance(loras, (str, os.PathLike, LoRA)) or (
        isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float)) and not isinstance(loras[1], bool)
    )
    items = [loras] if single else list(loras)
    out: list[tuple[LoRA, float]] = []
    for item in items:
        src, strength = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(src, LoRA):
            from ..formats import load  # lazy: the reader is only needed for paths

            src = load(src)
        strength = float(strength)
        if strength != strength or strength in (float("inf"), float("-inf")):
            raise ValueError(f"strength of {src.source or 'LoRA'} must be finite, got {strength}")
        out.append((src, strength))
    if not out:
        raise ValueError("no LoRA given; pass a path, a LoRA, or a list of (path|LoRA, strength)")
    return out


def _label(lora: LoRA, i: int) -> str:
    return f"{i}:{os.path.basename(str(lora.source))}" if lora.source else f"{i}:lora"


def _fuse_pieces(layer: Layer, targets: list[Target], resolver: Resolver) -> list[tuple[nn.Parameter, Contribution]]:
    """Every (parameter, delta) of one layer; raises ShapeMismatchError before anything is kept."""
    pieces: list[tuple[nn.Parameter, Contribution]] = []
    base = _fused_base(layer, targets, resolver)
    for t in targets:
        pieces.extend(_target_pieces(layer, t, _module(resolver, t), base))
    _check_pieces(pieces)
    return pieces


def _module(resolver: Resolver, t: Target) -> nn.Module:
    """The module a target lands on; a PEFT tuner wrapper's ``base_layer`` (its own adapters keep working)."""
    return unwrap_tuner(resolver.module(t))


def _target_pieces(layer: Layer, t: Target, module: nn.Module, base: torch.Tensor | None) -> list[tuple[nn.Parameter, Contribution]]:
    """The (parameter, delta) pieces of one layer on one target module: weight, bias, extra parameters."""
    pieces: list[tuple[nn.Parameter, Contribution]] = []
    if layer.weight is not None:
        pieces.append(_weight_piece(layer, t, module, base))
    db = bias_delta(layer, t)
    if db is not None:
        b = get_param(module, "bias")
        if b is None:
            raise ShapeMismatchError(f"{t.module} has no bias for the {layer.bias_key} delta; the model was built with bias=False")
        pieces.append((b, Contribution(-1, layer.name, db.reshape(-1), t.dst_rows)))
    for name, delta in param_deltas(layer, t).items():
        p = get_param(module, name)
        if p is None:
            raise ShapeMismatchError(f"{t.module} has no parameter {name!r} for this layer's {name} delta")
        if delta.numel() != p.numel():
            raise ShapeMismatchError(f"{name} delta of shape {tuple(delta.shape)} does not fit {tuple(p.shape)}")
        pieces.append((p, Contribution(-1, layer.name, delta.reshape(p.shape), None)))
    return pieces


def _check_pieces(pieces: list[tuple[nn.Parameter, Contribution]]) -> None:
    for p, c in pieces:
        if c.delta is None or c.owner is not None:
            continue  # factor form: checked by low_rank_factors; quantized: shaped on the logical stand-in
        rows = p.shape if c.dst_rows is None else (c.dst_rows[1] - c.dst_rows[0], *p.shape[1:])
        if tuple(c.delta.shape) != tuple(rows):
            raise ShapeMismatchError(f"delta of shape {tuple(c.delta.shape)} does not fit {tuple(rows)}")


def _weight_piece(layer: Layer, t: Target, module: nn.Module, base: torch.Tensor | None) -> tuple[nn.Parameter, Contribution]:
    w = get_param(module, "weight")
    if w is None:
        raise ShapeMismatchError(f"{t.module} has no weight for the {layer.weight.kind} delta")
    stand_in = quant_proxy(module, values=layer.dora is not None)
    if stand_in is not None:  # a quantized layer: a dense delta of its logical shape, requantized at commit
        return w, Contribution(-1, layer.name, weight_delta(layer, t, stand_in.weight, base), t.dst_rows, owner=module)
    if is_transposed(module):  # transformers Conv1D (GPT-2): weight stored [in, out]
        return w, Contribution(-1, layer.name, transposed_delta(layer, t, w.data, base), None)
    factors = low_rank_factors(layer, t, w.data)
    if factors is not None:
        return w, Contribution(-1, layer.name, None, t.dst_rows, factors)
    return w, Contribution(-1, layer.name, weight_delta(layer, t, w.data, base), t.dst_rows)


def _fused_base(layer: Layer, targets: list[Target], resolver: Resolver) -> torch.Tensor | None:
    if layer.weight is None or not needs_fused_base(layer, targets):
        return None
    weights = []
    for t in targets:
        w = get_param(_module(resolver, t), "weight")
        if w is None:
            raise ShapeMismatchError(f"{t.module} has no weight for the {layer.weight.kind} delta")
        weights.append(w.data)
    return fused_base(layer, targets, weights)


def family_notes(resolver: Resolver, report: ApplyReport, loras: list[LoRA]) -> list[str]:
    """Each recognised family's remarks on what the LoRAs left out (e.g. Wan's image attention)."""
    from ..families import FAMILIES

    touched: dict[str, set[str]] = {}
    for per_layer in report.matched.values():
        for refs in per_layer.values():
            for ref in refs:
                touched.setdefault(ref.component, set()).add(ref.module)
    paths = [layer.path for lora in loras for layer in lora]
    notes: list[str] = []
    for family in FAMILIES:
        if family.name not in resolver.index.families:
            continue
        for comp, root in resolver.components.items():
            if family.matches_model(comp, root):
                notes.extend(family.notes(comp, root, touched.get(comp, set()), paths))
    return notes


def _mismatch_message(report: ApplyReport) -> str:
    items = sorted(f"{label}: {name}: {why}" for label, d in report.shape_mismatches.items() for name, why in d.items())
    return "\n  ".join(items)


@dataclasses.dataclass
class _Plan:
    """Everything an apply computed before touching the model: fuse contributions or hook branches."""

    fuse: FusePlan = dataclasses.field(default_factory=dict)
    hooks: dict[int, HookState] = dataclasses.field(default_factory=dict)
    touched: set[int] = dataclasses.field(default_factory=set)
    slots: ParamSlots = dataclasses.field(default_factory=ParamSlots)  # hook mode: parameters patched by value
    quant_names: dict[int, str] = dataclasses.field(default_factory=dict)  # id(quantized module) -> name
    branch: dict[int, tuple[str, nn.Module, list[Any]]] = dataclasses.field(default_factory=dict)  # branch mode


def _plan(patch: Patch, resolver: Resolver, strict: bool | None = None) -> _Plan:
    """Resolve every layer and compute its deltas (fuse) or branches (hook); record the report. Nothing changes."""
    plan = _Plan()
    report = patch.report
    for i, (lora, strength) in enumerate(patch.loras):
        label = _label(lora, i)
        res = resolver.resolve(lora)
        report.unmatched[label] = sorted(layer.name for layer in res.unmatched)
        report.matched[label] = {}
        report.shape_mismatches[label] = {}
        for layer, targets in res.matched:
            try:
                layer = bind_layer(layer, targets, lambda t: _module(resolver, t))  # OFT, (IA)^3, GLoRA, modules_to_save
                if patch.mode == "fuse":
                    _plan_fuse(plan, i, layer, targets, resolver, strength)
                elif patch.mode == "branch":
                    _plan_branch(plan, i, layer, targets, resolver)
                else:
                    _plan_hooks(plan, i, layer, targets, resolver, patch)
            except ShapeMismatchError as exc:
                report.shape_mismatches[label][layer.name] = str(exc)
                continue
            except UnsupportedAdapterError as exc:  # branch mode, a layer without a branch: strict=False skips it
                if patch.mode != "branch" or strict is not False:
                    raise
                report.shape_mismatches[label][layer.name] = str(exc)
                continue
            report.matched[label][layer.name] = [t.ref for t in targets]
            _note_quant(plan, report, targets, resolver)
            patch._lora_params += layer.parameters()
            plan.touched.update(id(m) for t in targets for m in (resolver.module(t), _module(resolver, t)))
    return plan


def _note_quant(plan: _Plan, report: ApplyReport, targets: list[Target], resolver: Resolver) -> None:
    """Record each quantized target's library, scheme and logical shape in the report."""
    for t in targets:
        module = _module(resolver, t)
        info = quant_describe(module)
        if info is not None:
            plan.quant_names[id(module)] = str(t.ref)
            report.quant.setdefault(str(t.ref), {"library": info.library, "scheme": info.scheme, "shape": list(info.shape)})


def _plan_fuse(plan: _Plan, i: int, layer: Layer, targets: list[Target], resolver: Resolver, strength: float) -> None:
    pieces = [] if strength == 0.0 else _fuse_pieces(layer, targets, resolver)
    for param, contrib in pieces:
        contrib.lora = i
        plan.fuse.setdefault(id(param), (param, []))[1].append(contrib)


def _plan_branch(plan: _Plan, i: int, layer: Layer, targets: list[Target], resolver: Resolver) -> None:
    """Branch mode: each target must be a low-rank-branch layer; its exact factors are appended at commit."""
    pieces = []
    for t in targets:
        module = _module(resolver, t)
        if not isinstance(module, LowRankQuantLinear):
            raise UnsupportedAdapterError(
                f"{layer.name} -> {t.ref}: a {type(module).__name__}, not a low-rank-branch layer "
                "(`lorakit quantize --lowrank`), so mode='branch' cannot put it there. Apply this model (or these "
                "layers, docs/quantized.md) with mode='hook', or pass strict=False to skip such layers"
            )
        if bias_delta(layer, t) is not None or param_deltas(layer, t):
            raise UnsupportedAdapterError(
                f"{layer.name} -> {t.ref}: bias or norm deltas have no place in a low-rank branch; use mode='hook'"
            )
        pieces.append((t, module, low_rank_factors(layer, t, module.weight)))
    for t, module, factors in pieces:
        plan.branch.setdefault(id(module), (str(t.ref), module, []))[2].append((i, factors, t.dst_rows))


def _check_finite(layer: Layer, label: str, dtypes: set[torch.dtype]) -> None:
    """Hook mode adds ``h(x)`` as it is: refuse a layer whose factors hold NaN/Inf, in the file's dtype or once
    cast to the model's (``dtypes``: a factor beyond float16's range becomes Inf), rather than produce an
    all-NaN output. Catches LoRAs built by hand or from a state dict that bypassed the reader's checks."""
    tensors: dict[str, torch.Tensor] = {} if layer.weight is None else dict(layer.weight.tensors())
    if layer.bias is not None:
        tensors[layer.bias_key] = layer.bias
    if layer.dora is not None:
        tensors["dora magnitude"] = layer.dora.magnitude
    bad = [
        f for f, t in tensors.items()
        if t.is_floating_point() and any(not bool(torch.isfinite(t.to(d)).all()) for d in {t.dtype, *dtypes})
    ]
    alpha = None if layer.weight is None else layer.weight.alpha
    if alpha is not None and not math.isfinite(float(alpha)):
        bad.append(f"alpha={alpha}")
    if bad:
        names = ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
        raise NonFiniteError(
            f"{label}: layer {layer.name} has NaN/Inf in {', '.join(bad)}"
            + (f" (as {names}, the model's dtype)" if names else "")
            + "; in hook mode it would make the outputs NaN. Nothing was applied; fix or re-export the LoRA."
        )


def _planning_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight hooks are planned on: a quantized layer's logical stand-in (compute dtype), else its weight."""
    stand_in = quant_proxy(module)
    return get_param(module, "weight") if stand_in is None else stand_in.weight


def _plan_hooks(plan: _Plan, i: int, layer: Layer, targets: list[Target], resolver: Resolver, patch: Patch) -> None:
    dtypes = {w.dtype for t in targets if (w := _planning_weight(_module(resolver, t))) is not None and w.is_floating_point()}
    _check_finite(layer, _label(patch.loras[i][0], i), dtypes)
    base = _fused_base(layer, targets, resolver)
    # every branch and slot piece is built (and checked) before any is recorded: a failing target leaves no half layer
    branches = []
    pieces: list[tuple[nn.Parameter, Contribution]] = []
    for t in targets:
        module = _module(resolver, t)
        hooked, by_value = split_for_hooks(layer, t, module)
        if hooked is not None:
            branches.append((t, module, make_branch(hooked, t, module, base)))
        if by_value is not None:
            pieces.extend(_target_pieces(by_value, t, module, base))
    _check_pieces(pieces)
    for param, contrib in pieces:
        contrib.lora = i
        plan.slots.add(param, contrib)
    for t, module, branch in branches:
        state = plan.hooks.get(id(module))
        if state is None:
            state = plan.hooks[id(module)] = HookState(module, patch._strengths)
        state.branches.append((i, branch, t.dst_rows))


def _check_plan(report: ApplyReport, target: object, components: dict[str, nn.Module], strict: bool) -> list[str]:
    """Raise when nothing matched (or, ``strict``, anything did not); return the unmatched layers otherwise."""
    n_matched = sum(len(v) for v in report.matched.values())
    unmatched = report.all_unmatched()
    if n_matched == 0:
        sample = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        problems = _mismatch_message(report)
        raise MatchError(
            f"no layer of the LoRA(s) matched a module of the {type(target).__name__} "
            f"(components: {', '.join(components)}; unmatched: {sample or '-'}"
            + (f"; shape mismatches:\n  {problems}" if problems else "")
            + "). Is it a LoRA for another model family?"
        )
    if strict and (unmatched or any(report.shape_mismatches.values())):
        parts = []
        if unmatched:
            parts.append(f"{len(unmatched)} layer(s) matched no module:\n  " + "\n  ".join(unmatched))
        if any(report.shape_mismatches.values()):
            parts.append("shape mismatches:\n  " + _mismatch_message(report))
        raise MatchError("strict=True and nothing was applied; " + "\n".join(parts) + "\nPass strict=False to skip these layers.")
    return unmatched


def _commit(patch: Patch, plan: _Plan, owner: str) -> None:
    """Change the model: swap in the fused tensors (fuse stages them all first) or install the hooks."""
    if patch.mode == "fuse":
        quantized = [(plan.quant_names.get(id(cs[0].owner), str(k)), cs[0].owner, cs)
                     for k, (_, cs) in plan.fuse.items() if cs and cs[0].owner is not None]
        plain = {k: v for k, v in plan.fuse.items() if not (v[1] and v[1][0].owner is not None)}
        staged = quant_stage(quantized, patch._strengths, patch.quant_options)  # before any change: may raise
        patch._backups = fuse(plain, patch._strengths, owner=owner)
        patch._undos = quant_commit(staged)
        for s in staged:
            patch.report.quant.setdefault(s.name, {})["requant_error"] = s.error
        quant_warn_lossy(staged, patch.quant_options.warn_threshold)
        patch.report.touched_tensors = len(patch._backups) + len(staged)
    elif patch.mode == "branch":
        patch._branch = list(plan.branch.values())
        patch._staged = quant_branch_stage(patch._branch, patch._strengths)  # may raise: nothing changed yet
        patch._undos = quant_branch_commit(patch._staged)
        for s in patch._staged:
            patch.report.quant.setdefault(s.name, {}).update(old_rank=s.old_rank, new_rank=s.new_rank)
        patch.report.touched_tensors = 2 * len(patch._staged)
    else:
        plan.slots.commit(patch._strengths)  # before any hook: may raise (NaN/Inf), leaving the model unchanged
        patch._slots = plan.slots
        for state in plan.hooks.values():
            patch._handles.extend(quant_register_output_hook(state.module, state))  # quanto int8 acts: x, not Q(x)
        patch.report.touched_tensors = sum(len(s.branches) for s in plan.hooks.values()) + len(plan.slots)


def _warn_skipped(report: ApplyReport, unmatched: list[str]) -> None:
    skipped = unmatched + [f"{k} (shape mismatch)" for k in sorted(
        f"{label}: {name}" for label, d in report.shape_mismatches.items() for name in d)]
    if skipped:
        warnings.warn(
            f"{len(skipped)} LoRA layer(s) were not applied:\n  " + "\n  ".join(skipped)
            + "\nPass strict=True to make this an error.",
            stacklevel=3,
        )


def _non_finite(reason: str) -> bool:
    """Whether a reader's reason for an invalid key is NaN/Inf (``NonFiniteError`` texts, ``alpha is nan``)."""
    return re.search(r"\b(nan|inf)\b", reason, re.IGNORECASE) is not None


def _check_invalid(items: list[tuple[LoRA, float]], strict: bool | None) -> None:
    """LoRAs whose files had broken layers (``lora.report.invalid``: NaN/Inf, incomplete, rank mismatch, ...):
    refuse, naming the files and keys (``strict`` None or True), or warn once and go on (``strict=False``)."""
    bad = [(_label(lora, i), lora, lora.report.invalid) for i, (lora, _) in enumerate(items) if lora.report.invalid]
    if not bad:
        return
    lines = [f"{label}: {key}: {why}" for label, _, invalid in bad for key, why in sorted(invalid.items())]
    files = ", ".join(lora.source or f"{label} (a state dict)" for label, lora, _ in bad)
    listing = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
    if strict is False:
        warnings.warn(
            f"{len(lines)} invalid LoRA key(s) in {files} were not applied (strict=False):\n  {listing}",
            stacklevel=3,
        )
        return
    reasons = [why for _, _, invalid in bad for why in invalid.values()]
    cls = NonFiniteError if all(_non_finite(why) for why in reasons) else FormatError
    raise cls(
        f"{files} has {len(lines)} invalid layer key(s); nothing was applied:\n  {listing}\n"
        "Fix or re-export the file, or pass strict=False to apply the other layers (with a warning)."
    )


def apply(
    target: object,
    loras: Any,
    *,
    mode: str = "fuse",
    strict: bool | None = None,
    component: str | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    requant_warn: float = 0.5,
) -> Patch:
    """Apply ``loras`` to ``target`` (a diffusers pipeline, a diffusers/transformers model, or any module).

    ``loras``: a path or :class:`LoRA`, or a list of ``(path|LoRA, strength)``. ``mode="fuse"`` writes
    ``round(W + Σ sᵢ ΔWᵢ)`` (fp32 math, rounded once); ``mode="hook"`` adds ``Σ sᵢ hᵢ(x)`` to module outputs.

    ``strict`` covers two kinds of problem: layers of the file that are broken (``lora.report.invalid``:
    NaN/Inf, incomplete pairs, rank mismatches) and layers that match no module or do not fit one.

    * ``None`` (default): broken layers refuse the whole apply (:class:`FormatError`, or
      :class:`NonFiniteError` when every problem is NaN/Inf, naming the file and keys); unmatched and
      shape-mismatched layers are skipped with a warning.
    * ``False``: both are skipped; one warning lists the broken layers, another the unmatched ones.
    * ``True``: both raise.

    Quantized layers (:mod:`lorakit.quant`: torchao, bitsandbytes, GGUF, quanto, fp8 + scale) are recognised and
    listed in ``patch.report.quant``. Hook mode leaves their storage untouched; fuse mode dequantizes, adds the
    deltas in fp32 and requantizes with the layer's own scheme (``rounding="stochastic"``, seeded by ``seed``, on
    float8 storage), records the relative error of the applied delta and warns above ``requant_warn``.

    ``mode="branch"`` (a model made by ``lorakit quantize --lowrank``): each LoRA's factors are appended to the
    layers' 16-bit low-rank branch, strength folded into ``up`` (exact, no requantization; several LoRAs compose by
    concatenation); ``remove()`` puts the original branch tensors back and ``set_strengths`` rebuilds the appended
    factors. A target layer without a branch raises :class:`UnsupportedAdapterError` naming it (``strict=False``
    skips it with a warning); so do adapters without exact factors (LoHa, LoKr, DoRA, bias or norm deltas).

    A LoRA matching nothing always raises :class:`MatchError`; in hook mode a layer holding NaN/Inf always
    raises :class:`NonFiniteError`. On any error the model is unchanged. Applies and removes on one model
    are serialised (a per-model lock: another thread's call waits); running the model while another thread
    applies or removes a patch on it is not supported.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    items = _normalise(loras)
    _check_invalid(items, strict)
    components = components_of(target, component)
    with _model_lock(components):
        resolver = Resolver(components)
        refuse_meta(components, target, resolver.index.modules)
        report = ApplyReport(mode=mode, families=list(resolver.index.families))
        patch = Patch(mode, items, report, components)
        patch.quant_options = QuantOptions(rounding, seed, requant_warn)
        plan = _plan(patch, resolver, strict)
        unmatched = _check_plan(report, target, components, bool(strict))
        _commit(patch, plan, type(target).__name__)  # everything is computed and checked: only now does the model change
        report.untouched_modules = sum(
            1
            for mods in resolver.index.modules.values()
            for m in mods.values()
            if id(m) not in plan.touched and isinstance(getattr(m, "weight", None), torch.Tensor)
        )
        report.notes = family_notes(resolver, report, [lora for lora, _ in items])
        report.invalid = {_label(lora, i): dict(sorted(lora.report.invalid.items()))
                          for i, (lora, _) in enumerate(items) if lora.report.invalid}
        for module in components.values():
            _STACKS.setdefault(module, []).append(patch)
    _warn_skipped(report, unmatched)
    return patch
