"""What the runtime asks of a quantized layer: its scheme for the report, a float stand-in of its logical shape for
planning hooks and deltas, and the fuse route ``W ← Q(deq(W) + Σ sᵢ ΔWᵢ)`` with the requantization error of the
applied delta per layer and the original quantized objects kept for a bit-exact ``remove()``.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InternalError, NonFiniteError
from .schemes import QuantInfo, QuantKind, kind_of, swap_state

__all__ = ["QuantOptions", "Staged", "commit", "describe", "is_quantized", "proxy", "register_output_hook", "stage",
           "warn_lossy"]

ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Fuse options for quantized layers: ``rounding`` ("nearest" or "stochastic", float8 storage only), the
    ``seed`` of stochastic rounding (combined with each layer's name) and the relative error of the applied delta
    above which ``apply`` warns and names hook mode."""

    rounding: str = "nearest"
    seed: int = 0
    warn_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")


def is_quantized(module: nn.Module) -> bool:
    return kind_of(module) is not None


def describe(module: nn.Module) -> QuantInfo | None:
    kind = kind_of(module)
    return None if kind is None else kind.info(module)


def proxy(module: nn.Module, values: bool = False) -> nn.Linear | None:
    """A plain Linear standing in for a quantized ``module`` while planning: its logical shape in the compute dtype
    on the meta device (no memory), or with the dequantized weight when ``values`` (DoRA needs the base). ``None``
    for a layer that is not quantized."""
    kind = kind_of(module)
    if kind is None:
        return None
    info = kind.info(module)
    out_f, in_f = info.shape[0], int(torch.Size(info.shape[1:]).numel())
    if values:
        stand_in = nn.Linear(in_f, out_f, bias=False, dtype=torch.float32)
        stand_in.weight = nn.Parameter(kind.dequantize(module).reshape(out_f, in_f), requires_grad=False)
        return stand_in
    return nn.Linear(in_f, out_f, bias=False, device="meta", dtype=info.compute_dtype)


def _quantizes_input(module: nn.Module) -> bool:
    """Whether ``module`` quantizes its own input in a forward pre-hook (optimum-quanto with activations)."""
    hooks = getattr(module, "_quantize_hooks", None)
    return isinstance(hooks, dict) and "input" in hooks and getattr(module, "activation_qtype", None) is not None


class _FloatInput:
    """A pre-hook run before the library's own (``prepend=True``) keeps the float input; the forward hook hands it
    to ``hook`` in place of the quantized input the forward saw. Per thread; one pending call per module (a module
    is not re-entered during its own forward)."""

    def __init__(self, hook: Callable[..., Any]) -> None:
        self.hook = hook
        self.local = threading.local()

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.local.args = args

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        raw = getattr(self.local, "args", None)
        self.local.args = None
        return self.hook(module, args if raw is None else raw, output)


def register_output_hook(module: nn.Module, hook: Callable[..., Any]) -> list[Any]:
    """Register ``hook(module, args, output)`` as a forward hook; return the handles to remove. On a layer that
    quantizes its input itself (optimum-quanto with int8/fp8 activations), ``hook`` gets the float input ``x``, not
    ``Q(x)``, as a LoRA wrapper around the layer (PEFT's) would."""
    if not _quantizes_input(module):
        return [module.register_forward_hook(hook)]
    keep = _FloatInput(hook)
    return [module.register_forward_pre_hook(keep.pre, prepend=True), module.register_forward_hook(keep.post)]


@dataclasses.dataclass
class Staged:
    """A quantized layer's new state, computed but not yet swapped in, and its requantization error."""

    name: str
    module: nn.Module
    kind: QuantKind
    new_state: dict[str, Any]
    error: float
    delta_norm: float
    rounding: str = "nearest"


def _applied_delta(shape: Sequence[int], contribs: list[Any], strengths: Sequence[float]) -> torch.Tensor:
    total = torch.zeros(tuple(shape), dtype=torch.float32)
    for c in contribs:
        if c.delta is None:
            raise InternalError(f"{c.layer}: a quantized layer's contribution must carry a dense delta")
        view = total if c.dst_rows is None else total[c.dst_rows[0]:c.dst_rows[1]]
        view.add_(c.delta.to(view.device).reshape(view.shape), alpha=float(strengths[c.lora]))
    return total


def _stage_one(name: str, module: nn.Module, contribs: list[Any], strengths: Sequence[float],
               options: QuantOptions) -> Staged | None:
    kind = kind_of(module)
    if kind is None:
        raise InternalError(f"{name}: planned as quantized but its weight is a plain tensor now")
    live = [c for c in contribs if strengths[c.lora] != 0.0]
    if not live:
        return None  # strength 0: the quantized storage stays as it is
    base = kind.dequantize(module)
    delta = _applied_delta(base.shape, live, strengths).to(base.device)
    target = base + delta
    if not bool(torch.isfinite(target).all()):
        raise NonFiniteError(f"fusing {', '.join(sorted({c.layer for c in live}))} into {name} gives NaN/Inf; "
                             "nothing was changed. Lower the strength or apply with mode='hook'.")
    generator = torch.Generator().manual_seed((options.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    new_state = kind.requantize(module, target, options.rounding, generator)
    old = swap_state(module, new_state)  # dequantize the new state through the library's own code
    try:
        fused = kind.dequantize(module)
    finally:
        swap_state(module, old)
    norm = float(delta.norm())
    error = float((fused - base - delta).norm()) / norm if norm > 0 else 0.0
    return Staged(name, module, kind, new_state, error, norm, options.rounding)


def stage(entries: list[tuple[str, nn.Module, list[Any]]], strengths: Sequence[float],
          options: QuantOptions) -> list[Staged]:
    """Requantize every planned quantized layer (``(name, module, contributions)``); nothing is swapped yet."""
    staged = [_stage_one(name, module, contribs, strengths, options) for name, module, contribs in entries]
    return [s for s in staged if s is not None]


def commit(staged: list[Staged]) -> list[Callable[[], None]]:
    """Swap the new states in; return one undo per layer (it puts the very original objects back)."""
    undos: list[Callable[[], None]] = []
    for s in staged:
        old = swap_state(s.module, s.new_state)
        undos.append(lambda module=s.module, old=old: swap_state(module, old) and None)
    return undos


def warn_lossy(staged: list[Staged], threshold: float) -> None:
    lossy = sorted((s for s in staged if s.error > threshold), key=lambda s: -s.error)
    if not lossy:
        return
    listing = "\n  ".join(f"{s.name} ({s.kind.info(s.module).label()}): relative error {s.error:.3f}" for s in lossy[:20])
    more = f"\n  ... and {len(lossy) - 20} more" if len(lossy) > 20 else ""
    if any(s.rounding == "nearest" and s.kind.float8(s.module) for s in lossy):
        also = " (or rounding='stochastic' on the float8 layers: unbiased on average, but noisy per weight)"
    elif any(s.rounding == "stochastic" for s in lossy):
        also = " (stochastic rounding keeps the LoRA on average, but its noise per weight is this large)"
    else:
        also = ""
    warnings.warn(
        f"requantizing lost most of the LoRA on {len(lossy)} quantized layer(s) (relative error of the applied "
        f"delta above {threshold}):\n  {listing}{more}\nApply with mode='hook' to keep the LoRA exact on the "
        f"quantized base{also}.",
        stacklevel=4,
    )
