"""Apply LoRAs to a live model: fused (``W ← round(W + Σ sᵢ ΔWᵢ)`` in fp32, original tensors kept for a
bit-exact ``remove()``) or as forward hooks (``y = f(x) + Σ sᵢ hᵢ(x)``, strengths changeable live).

Where backups live: fusing replaces each touched parameter's ``.data`` with a new tensor on the same
device and keeps the original tensor object itself, so ``remove()`` puts back the very same storage
(no copy, no drift). The extra memory is one copy of each touched tensor while a patch is active.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import LoRAWeights
from ..adapters.base import module_op
from ..errors import MatchError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from ..families import Target, build_index
from ..model import Layer, LoRA
from .resolve import components_of, resolve

__all__ = ["ApplyReport", "Patch", "apply"]

LoraSpec = "str | os.PathLike[str] | LoRA | tuple[str | os.PathLike[str] | LoRA, float]"


@dataclasses.dataclass
class ApplyReport:
    """What an apply did: ``matched`` file layer -> target module(s), per LoRA."""

    matched: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    unmatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    shape_mismatches: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    untouched_modules: int = 0
    families: list[str] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            src: {
                "matched": len(self.matched.get(src, {})),
                "unmatched": len(self.unmatched.get(src, [])),
                "shape_mismatches": len(self.shape_mismatches.get(src, {})),
            }
            for src in self.matched.keys() | self.unmatched.keys()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "unmatched": self.unmatched,
            "shape_mismatches": self.shape_mismatches,
            "untouched_modules": self.untouched_modules,
            "families": self.families,
        }

    def __str__(self) -> str:
        lines = []
        for src, c in self.counts().items():
            lines.append(f"{src}: {c['matched']} layers matched, {c['unmatched']} unmatched, {c['shape_mismatches']} shape mismatches")
        return "\n".join(lines)


def _normalise(loras: Any) -> list[tuple[LoRA, float]]:
    from .. import load

    if isinstance(loras, (str, os.PathLike, LoRA)) or (
        isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float))
    ):
        loras = [loras]
    out = []
    for item in loras:
        src, strength = (item, 1.0) if not isinstance(item, tuple) else item
        out.append((load(src), float(strength)))
    return out


def _label(lora: LoRA, i: int) -> str:
    return f"#{i} {lora.source}" if lora.source else f"#{i}"


# -- delta pieces ---------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return t if rows is None else t[rows[0]:rows[1]]


def _transform(t: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        return t
    if name == "swap_scale_shift":
        half = t.shape[0] // 2
        return torch.cat([t[half:], t[:half]], dim=0)
    raise ValueError(f"unknown target transform {name!r}")


def _dora_rows(layer: Layer, rows: tuple[int, int] | None):
    dora = layer.dora
    if dora is None or rows is None:
        return dora
    if dora.axis != "out":
        raise UnsupportedAdapterError(
            f"{layer.name}: a DoRA normalised per input column cannot be split across separate modules"
        )
    mag = dora.magnitude.reshape(-1)[rows[0]:rows[1]]
    return dataclasses.replace(dora, magnitude=mag)


def _weight_delta(layer: Layer, target: Target, base: torch.Tensor) -> torch.Tensor | None:
    """fp32 delta for ``base`` (the target rows of the target weight), strength not applied."""
    if layer.weight is None:
        return None
    w = layer.weight
    dst_shape = tuple(base.shape)
    natural = w.delta_weight()
    if target.src_rows is not None or target.transform is not None:
        full_rows = natural.shape[0]
        natural = natural.reshape(full_rows, -1) if natural.dim() != len(dst_shape) else natural
        natural = _rows(_transform(natural, target.transform), target.src_rows)
    if natural.numel() != base.numel():
        raise ShapeMismatchError(
            f"{layer.name}: delta {tuple(natural.shape)} does not fit {target.module}.weight {dst_shape}"
        )
    delta = natural.reshape(dst_shape)
    dora = _dora_rows(layer, target.src_rows) if (target.src_rows is not None) else layer.dora
    if dora is not None:
        delta = dora.apply(base, delta)
    return delta


def _bias_delta(layer: Layer, target: Target) -> torch.Tensor | None:
    b = layer.delta_bias()
    if b is None:
        return None
    return _rows(_transform(b, target.transform), target.src_rows)


# -- the patch -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Entry:
    param: nn.Parameter | torch.Tensor
    rows: tuple[int, int] | None
    delta: torch.Tensor  # fp32, strength applied


class Patch:
    """An applied set of LoRAs. ``remove()`` undoes it (bit-exact in fuse mode); in hook mode
    ``set_strengths`` changes the strengths for the next forward."""

    def __init__(self, mode: str, loras: list[tuple[LoRA, float]], report: ApplyReport, components: dict[str, nn.Module]):
        self.mode = mode
        self.loras = loras
        self.report = report
        self.components = components
        self._backups: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._strengths = torch.tensor([s for _, s in loras], dtype=torch.float64).tolist()
        self._lora_params = 0
        self.removed = False

    @property
    def strengths(self) -> list[float]:
        return list(self._strengths)

    def set_strengths(self, strengths: Sequence[float]) -> None:
        if self.mode != "hook":
            raise UnsupportedAdapterError("strengths of a fused patch are baked in; remove() and apply again, or use mode='hook'")
        if len(strengths) != len(self._strengths):
            raise ValueError(f"expected {len(self._strengths)} strengths, got {len(strengths)}")
        self._strengths[:] = [float(s) for s in strengths]

    def param_stats(self) -> dict[str, float]:
        total = sum(p.numel() for m in self.components.values() for p in m.parameters())
        return {"total_parameters": total, "lora_parameters": self._lora_params,
                "ratio": self._lora_params / total if total else 0.0}

    def remove(self) -> None:
        if self.removed:
            return
        for module in self.components.values():
            stack = getattr(module, "_lorakit_patches", [])
            if stack and stack[-1] is not self:
                raise RuntimeError(
                    "this patch is not the most recent one on the model; remove patches in reverse order"
                )
        for handle in self._handles:
            handle.remove()
        for param, original in reversed(self._backups):
            param.data = original
        for module in self.components.values():
            stack = getattr(module, "_lorakit_patches", [])
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
        return f"<Patch mode={self.mode} loras={len(self.loras)} {'removed' if self.removed else 'active'}>"


def apply(
    target: object,
    loras: Any,
    *,
    mode: str = "fuse",
    strict: bool = False,
    component: str | None = None,
) -> Patch:
    """Apply ``loras`` (paths, LoRA objects, or ``(source, strength)`` pairs) to ``target``."""
    if mode not in ("fuse", "hook"):
        raise ValueError(f"mode must be 'fuse' or 'hook', got {mode!r}")
    items = _normalise(loras)
    components = components_of(target, component)
    index = build_index(components)
    report = ApplyReport(families=list(index.families))
    plan: list[tuple[int, Layer, list[Target]]] = []
    touched: set[tuple[str, str]] = set()
    for i, (lora, _) in enumerate(items):
        label = _label(lora, i)
        res = resolve(lora, components, index)
        report.matched[label] = {l.name: [t.module for t in ts] for l, ts in res.matched}
        report.unmatched[label] = sorted(l.name for l in res.unmatched)
        for layer, targets in res.matched:
            plan.append((i, layer, targets))
            touched.update((t.component, t.module) for t in targets)
    report.untouched_modules = sum(len(index.modules[c]) for c in index.modules) - len(touched)
    n_matched = sum(len(v) for v in report.matched.values())
    if n_matched == 0:
        names = [n for v in report.unmatched.values() for n in v][:8]
        raise MatchError(
            f"no layer of the LoRA matched a module of the {type(target).__name__} "
            f"(first layers: {', '.join(names)}). Is it a LoRA for another model family?"
        )
    patch = Patch(mode, items, report, components)
    if mode == "fuse":
        _fuse(patch, plan, index, strict)
    else:
        _hook(patch, plan, index, strict)
    unmatched = sorted(n for v in report.unmatched.values() for n in v)
    if strict and unmatched:
        patch.remove()
        raise MatchError(f"{len(unmatched)} LoRA layers matched no module (strict=True): " + ", ".join(unmatched[:20]))
    if unmatched:
        warnings.warn(f"{len(unmatched)} LoRA layers matched no module and were skipped: " + ", ".join(unmatched), stacklevel=2)
    for module in components.values():
        if not hasattr(module, "_lorakit_patches"):
            module._lorakit_patches = []  # type: ignore[attr-defined]
        module._lorakit_patches.append(patch)
    return patch


def _get_param(index, target: Target, name: str) -> torch.Tensor | None:
    module = index.modules[target.component][target.module]
    mapped = dict(target.param_map).get(name, name)
    return getattr(module, mapped, None)


def _fuse(patch: Patch, plan, index, strict: bool) -> None:
    sums: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def add(param, rows, delta, label, layer):
        if param is None:
            raise ShapeMismatchError(f"{layer.name}: the target has no such parameter")
        key = id(param)
        if key not in sums:
            sums[key] = (param, torch.zeros(param.shape, dtype=torch.float32, device=param.device))
        acc = sums[key][1]
        view = acc if rows is None else acc[rows[0]:rows[1]]
        if view.numel() != delta.numel():
            raise ShapeMismatchError(f"{layer.name}: delta {tuple(delta.shape)} does not fit {tuple(view.shape)}")
        view += delta.reshape(view.shape).to(view.device)

    for i, layer, targets in plan:
        s = patch._strengths[i]
        label = _label(patch.loras[i][0], i)
        for target in targets:
            try:
                module = index.modules[target.component][target.module]
                params = list(layer.params.items())
                if layer.weight is not None:
                    weight = module.weight
                    base = _rows(weight.detach(), target.dst_rows).float()
                    delta = _weight_delta(layer, target, base)
                    add(weight, target.dst_rows, s * delta, label, layer)
                bias = _bias_delta(layer, target)
                if bias is not None:
                    if module.bias is None:
                        raise ShapeMismatchError(f"{layer.name}: {target.module} has no bias for the bias delta")
                    add(module.bias, target.dst_rows, s * bias, label, layer)
                for name, t in params:
                    param = _get_param(index, target, name)
                    add(param, None, s * t.float(), label, layer)
            except (ShapeMismatchError, UnsupportedAdapterError) as exc:
                if strict:
                    raise
                patch.report.shape_mismatches.setdefault(label, {})[layer.name] = str(exc)
                continue
        patch._lora_params += layer.parameters()
    # Compute every new tensor before swapping any in: a failure leaves the model untouched.
    new: list[tuple[nn.Parameter, torch.Tensor]] = []
    for param, acc in sums.values():
        result = (param.detach().float() + acc).to(param.dtype)
        if not bool(torch.isfinite(result).all()):
            raise NonFiniteError(
                "applying the LoRA produced NaN/Inf in a weight; the file is corrupt or the strength too large "
                "for the weight dtype. Nothing was changed."
            )
        new.append((param, result))
    for param, result in new:
        patch._backups.append((param, param.data))
        param.data = result


class _HookState:
    def __init__(self):
        self.items: list[tuple[int, Callable[[torch.Tensor], torch.Tensor], tuple[int, int] | None, torch.Tensor | None]] = []


def _hook(patch: Patch, plan, index, strict: bool) -> None:
    states: dict[int, tuple[nn.Module, _HookState]] = {}
    for i, layer, targets in plan:
        label = _label(patch.loras[i][0], i)
        if layer.params or (layer.weight is not None and layer.weight.kind == "norm"):
            exc = UnsupportedAdapterError(f"{layer.name}: norm/modulation deltas have no hook path; use mode='fuse'")
            if strict:
                raise exc
            patch.report.shape_mismatches.setdefault(label, {})[layer.name] = str(exc)
            continue
        for target in targets:
            module = index.modules[target.component][target.module]
            try:
                fn = _make_fn(layer, target, module)
            except (ShapeMismatchError, UnsupportedAdapterError) as exc:
                if strict:
                    raise
                patch.report.shape_mismatches.setdefault(label, {})[layer.name] = str(exc)
                continue
            bias = _bias_delta(layer, target)
            st = states.setdefault(id(module), (module, _HookState()))[1]
            st.items.append((i, fn, target.dst_rows, bias))
        patch._lora_params += layer.parameters()
    strengths = patch._strengths
    for module, st in states.values():
        channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1

        def hook(mod, args, output, st=st, channel_dim=channel_dim):
            x = args[0]
            extra = None
            for i, fn, rows, bias in st.items:
                s = strengths[i]
                if s == 0.0:
                    continue
                h = fn(x)
                if bias is not None:
                    shape = [1] * output.dim()
                    shape[channel_dim] = -1
                    b = bias.to(device=output.device, dtype=output.dtype).reshape(shape)
                    h = b if h is None else h + b
                if h is None:
                    continue
                h = h * s
                if rows is not None:
                    full = torch.zeros_like(output) if extra is None else extra
                    full.narrow(channel_dim, rows[0], rows[1] - rows[0]).add_(h)
                    extra = full
                else:
                    extra = h if extra is None else extra + h
            return output if extra is None else output + extra

        patch._handles.append(module.register_forward_hook(hook))


def _make_fn(layer: Layer, target: Target, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    w = layer.weight
    if w is None:
        return lambda x: None  # bias-only layer: the hook adds the bias delta alone
    if (
        isinstance(w, LoRAWeights) and layer.dora is None and w.mid is None and target.transform is None
        and w.down.dim() == 2 and isinstance(module, nn.Linear)
    ):
        down = w.down
        up = _rows(w.up, target.src_rows)
        scale = w.scale

        def low_rank(x):
            return torch.nn.functional.linear(torch.nn.functional.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale

        return low_rank
    if isinstance(w, LoRAWeights) and layer.dora is None and target.src_rows is None and target.transform is None:
        return lambda x: w.delta_output(x, module)
    base = _rows(module.weight.detach(), target.dst_rows).float()
    delta = _weight_delta(layer, target, base)
    cache: dict[tuple, torch.Tensor] = {}

    def dense(x):
        key = (x.dtype, x.device)
        if key not in cache:
            cache[key] = delta.to(dtype=x.dtype, device=x.device)
        return module_op(module, x, cache[key])

    return dense
