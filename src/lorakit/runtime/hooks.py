"""The unfused path: a forward hook per patched module computing ``y = f(x) + Σ sᵢ hᵢ(x)``, weights
untouched; strengths are read at every forward so they can change live. Each ``hᵢ`` is the adapter's own
``delta_output`` (:mod:`lorakit.placement` picks the adapter for the target's rows).

Deltas with no output form (norm weights, modulation tables, biases of non-linear modules, a weight delta on a
module whose op is not linear in its weight) go to :class:`ParamSlots` instead: the original tensor is kept and
``round(W + Σ sᵢ ΔWᵢ)`` (fp32 math, rounded once: the fuse path's own arithmetic) is materialised into a separate
tensor put in the parameter, again whenever the strengths change; removal puts the original tensor object back.

A PEFT tuner layer (a diffusers/PEFT ``LoraLayer`` wrapper) is patched through its ``base_layer``
(:func:`unwrap_tuner`), so PEFT's own adapters keep adding their output on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRAWeights
from ..errors import PatchOrderError, UnsupportedAdapterError
from ..families import Target
from ..model import Layer
from ..placement import bias_delta, is_transposed, oriented_weight, rows_adapter
from ..quant import proxy as quant_proxy
from .fuse import Contribution, fused_value, same_tensor

__all__ = ["HookState", "ParamSlots", "make_branch", "split_for_hooks", "unwrap_tuner"]

Branch = Callable[[torch.Tensor], torch.Tensor]


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _bias_shape(module: nn.Module, x: torch.Tensor, n: int) -> tuple[int, ...]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (1, n, *([1] * (x.dim() - 2)))
    return (n,)


def unwrap_tuner(module: nn.Module) -> nn.Module:
    """The layer a PEFT tuner wrapper (``peft.tuners.*.layer``: ``LoraLayer`` & co., as diffusers' ``load_lora_weights``
    installs them) runs as its base: ``module.base_layer``, followed through nested wrappers; ``module`` otherwise.
    Patching the base keeps the wrapper's own adapters working: ``y = base'(x) + Σ peft adapters(x)``."""
    seen = 0
    while seen < 8 and type(module).__module__.startswith("peft.") and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
        seen += 1
    return module


def _has_op(module: nn.Module) -> bool:
    """Whether a module's output is linear in its weight with an op :func:`module_op` runs (Linear, conv, Conv1D)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_transposed(module)


def split_for_hooks(layer: Layer, target: Target, module: nn.Module) -> tuple[Layer | None, Layer | None]:
    """``(branch part, slot part)`` of ``layer`` on ``module``: what a forward hook adds to the output, and what is
    materialised into the module's parameters instead (:class:`ParamSlots`). A weight delta goes to the hook when the
    module's op is linear in its weight and the adapter has an output form; otherwise the whole layer (weight, bias,
    params) goes to the slots, so that a bias tied to the weight (PEFT ``lora_B.bias``) is counted once. Extra
    parameter deltas (``diff_m``: modulation tables) always go to the slots. A quantized module keeps everything
    but its extra parameters on the hook path (its storage is never rewritten in hook mode)."""
    quantized = quant_proxy(module, values=layer.dora is not None)
    params_only = dataclasses.replace(layer, weight=None, dora=None, bias=None) if layer.params else None
    rest = dataclasses.replace(layer, params={}) if layer.params else layer
    if rest.weight is None and rest.bias is None and layer.delta_bias() is None:
        return None, params_only
    if quantized is not None:
        return rest, params_only
    op = _has_op(module)
    weight_ok = rest.weight is None or (
        op and rest.weight.unfused_problem(module) is None
        and not (target.dst_rows is not None and getattr(module, "groups", 1) != 1)
    )
    if weight_ok and op:
        return rest, params_only
    return None, layer


def _refuse(layer: Layer, target: Target, module: nn.Module) -> None:
    """Raise before any hook is installed when no unfused path exists for this layer on this module."""
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not is_transposed(module):
        raise UnsupportedAdapterError(
            f"{layer.name}: no unfused path for a {type(module).__name__} target ({target.module}); "
            "apply this LoRA with mode='fuse'"
        )
    problem = layer.weight.unfused_problem(module) if layer.weight is not None else None
    if problem is None and layer.params:
        problem = "parameter deltas have no unfused path"
    if problem:
        raise UnsupportedAdapterError(f"{layer.name} ({', '.join(layer.kinds)}): {problem}; apply this LoRA with mode='fuse'")
    if target.dst_rows is not None and getattr(module, "groups", 1) != 1:
        raise UnsupportedAdapterError(f"{layer.name}: row-split delta on a grouped conv; use mode='fuse'")


def make_branch(layer: Layer, target: Target, module: nn.Module, base: torch.Tensor | None = None) -> Branch:
    """``h(x)`` for the rows of ``module``'s output this target covers (strength 1); ``base``: the rebuilt
    fused weight of a DoRA layer split over several modules (``placement.fused_base``). A quantized ``module``
    (:mod:`lorakit.quant`) is planned on a float Linear of its logical shape; its own forward stays untouched."""
    module = quant_proxy(module, values=layer.dora is not None) or module
    _refuse(layer, target, module)
    adapter = None if layer.weight is None else rows_adapter(layer, target, oriented_weight(module), base)
    bias = bias_delta(layer, target)
    if adapter is None and bias is None:
        raise UnsupportedAdapterError(f"{layer.name}: nothing to apply in hook mode ({', '.join(layer.kinds)})")
    bias_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    # A LoRA's factors moved once per (dtype, device) the module runs in: at apply time for the module's own
    # weight, again only when the module moves (CPU offload moves it to the GPU for its forward); a forward never
    # copies factors. At most two copies are kept (offload alternates between two devices). Other adapters cache
    # their materialised delta per (dtype, device) themselves (WeightAdapter.delta_output).
    casts: dict[tuple[torch.dtype, torch.device], Any] = {}

    def cast(dtype: torch.dtype, device: torch.device) -> Any:
        if not isinstance(adapter, LoRAWeights):
            return adapter
        key = (dtype, device)
        hit = casts.get(key)
        if hit is None:
            if len(casts) >= 2:
                casts.clear()
            hit = casts[key] = adapter.to(dtype=dtype, device=device)
        return hit

    weight = getattr(module, "weight", None)
    if adapter is not None and isinstance(weight, torch.Tensor) and weight.is_floating_point() \
            and weight.device.type != "meta":
        cast(weight.dtype, weight.device)

    def branch(x: torch.Tensor) -> torch.Tensor:
        h = None if adapter is None else cast(x.dtype, x.device).delta_output(x, module)
        if bias is not None:
            key = (x.dtype, x.device)
            b = bias_cache.get(key)
            if b is None:
                b = bias_cache[key] = bias.to(dtype=x.dtype, device=x.device).reshape(_bias_shape(module, x, bias.numel()))
            h = b if h is None else h + b
        return h

    if bias is None and _stackable(adapter, module):
        branch.factors = cast  # type: ignore[attr-defined]  # HookState stacks such branches into one GEMM pair
    return branch


def _stackable(adapter: Any, module: nn.Module) -> bool:
    """Whether a branch is a plain 2-D LoRA on a Linear (or a 1×1 conv): ``up @ (down @ x)``, which
    :class:`HookState` concatenates with the other LoRAs on the module into one GEMM pair."""
    if not isinstance(adapter, LoRAWeights) or adapter.mid is not None or adapter.up_bias is not None:
        return False
    if adapter.up.dim() != 2 and any(k != 1 for k in adapter.up.shape[2:]):
        return False
    if adapter.down.dim() != 2 and any(k != 1 for k in adapter.down.shape[2:]):
        return False
    if isinstance(module, nn.Linear):
        return adapter.down.dim() == 2 and adapter.up.dim() == 2
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1) and tuple(module.dilation) == (1, 1)
            and tuple(module.padding) == (0, 0) and isinstance(module.padding, tuple))


class HookState:
    """The branches of one patch on one module; the hook reads ``strengths`` at every call.

    Plain LoRA branches on the module's full output (2-D factors on a Linear or a 1×1 conv) are stacked: their
    ``down`` factors are concatenated along the rank and their ``up`` factors, each scaled by ``strength · α/r``,
    likewise, so that ``Σ sᵢ upᵢ(downᵢ x)`` is one GEMM pair added into the output in place (``addmm_``) instead
    of two GEMMs, a scale and an add per LoRA. The stack is rebuilt when the strengths, dtype or device change
    (at most two kept); other branches run one by one."""

    def __init__(self, module: nn.Module, strengths: Sequence[float]) -> None:
        self.module = module
        self.strengths = strengths
        self.branches: list[tuple[int, Branch, tuple[int, int] | None]] = []
        self.channel_dim = _channel_dim(module)
        self._stacks: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._split: tuple[list[tuple[int, Branch]], list[tuple[int, Branch, tuple[int, int] | None]]] | None = None

    def _parts(self) -> tuple[list[tuple[int, Branch]], list[tuple[int, Branch, tuple[int, int] | None]]]:
        if self._split is None or sum(map(len, self._split)) != len(self.branches):
            stacked = [(i, b) for i, b, dst in self.branches if dst is None and hasattr(b, "factors")]
            rest = [(i, b, dst) for i, b, dst in self.branches if not (dst is None and hasattr(b, "factors"))]
            self._split = (stacked, rest)
            self._stacks.clear()
        return self._split

    def _stack(self, stacked: list[tuple[int, Branch]], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        strengths = tuple(float(self.strengths[i]) for i, _ in stacked)
        key = (x.dtype, x.device, strengths)
        if key in self._stacks:
            return self._stacks[key]
        downs, ups = [], []
        for (_, b), s in zip(stacked, strengths):
            if s == 0.0:
                continue  # strength 0 is the identity, and costs nothing
            f = b.factors(x.dtype, x.device)  # type: ignore[attr-defined]
            downs.append(f.down.flatten(1))
            ups.append(f.up.flatten(1) * (s * f.scale))
        stack = None if not downs else (
            (downs[0], ups[0]) if len(downs) == 1 else (torch.cat(downs), torch.cat(ups, dim=1)))
        if len(self._stacks) >= 2:
            self._stacks.clear()
        self._stacks[key] = stack
        return stack

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        y = output
        stacked, rest = self._parts()
        if stacked:
            stack = self._stack(stacked, x)
            if stack is not None:
                y = _add_stacked(y, x, *stack, self.channel_dim)
        cloned = False
        for lora, branch, dst in rest:
            s = self.strengths[lora]
            if s == 0.0:
                continue  # strength 0 is the identity, and costs nothing
            h = branch(x)
            if dst is None:
                y = y + h * s  # broadcasting also covers a bias-only branch
            else:
                if not cloned:
                    y, cloned = y.clone(), True
                y.narrow(self.channel_dim, dst[0], dst[1] - dst[0]).add_(h, alpha=s)
        return y


def _add_stacked(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``y + up @ (down @ x)`` over the channel dim: into ``y`` in place when nothing needs ``y`` for autograd
    (the module's fresh output, no grad recorded), else out of place."""
    if channel_dim == 1:  # 1×1 conv: channels first
        h = F.conv2d(x, down[:, :, None, None])
        d = F.conv2d(h, up[:, :, None, None])
        return y.add_(d) if _in_place_ok(y) and y.dtype == d.dtype else y + d
    h = F.linear(x, down)
    if _in_place_ok(y) and y.is_contiguous() and y.dtype == h.dtype == up.dtype:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
        return y
    return y + F.linear(h, up)  # autocast / autograd / a strided output: plain ops, type promotion as before


def _in_place_ok(y: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and y.requires_grad)


@dataclasses.dataclass
class _Slot:
    param: nn.Parameter
    contribs: list[Contribution]
    original: torch.Tensor | None = None  # the tensor the parameter held before the patch (put back by restore)
    current: torch.Tensor | None = None  # the tensor the patch last put in the parameter


class ParamSlots:
    """Hook mode's path for deltas with no output form: per parameter, the original tensor is kept and
    ``round(W + Σ sᵢ ΔWᵢ)`` is materialised into a separate tensor (the original itself when every strength is 0),
    by :meth:`commit` and again by :meth:`update` when the strengths change. :meth:`restore` puts the original
    tensor object back (bit-exact, same storage and dtype). Every new value is computed and checked before any
    parameter changes."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, param: nn.Parameter, contrib: Contribution) -> None:
        slot = self._slots.get(id(param))
        if slot is None:
            slot = self._slots[id(param)] = _Slot(param, [])
        slot.contribs.append(contrib)

    def _values(self, strengths: Sequence[float], sources: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for slot, source in zip(self._slots.values(), sources):
            live = [c for c in slot.contribs if strengths[c.lora] != 0.0]
            out.append(source if not live else fused_value(source, live, list(strengths)))
        return out

    def commit(self, strengths: Sequence[float]) -> None:
        """Keep each parameter's tensor and put its materialised value in."""
        originals = [slot.param.data for slot in self._slots.values()]
        values = self._values(strengths, originals)  # may raise: nothing changed yet
        for slot, original, value in zip(self._slots.values(), originals, values):
            slot.original, slot.current = original, value
            slot.param.data = value

    def check(self) -> None:
        """Raise :class:`PatchOrderError` when a parameter no longer holds this patch's tensor (a later patch on the
        same model changed it): re-materialising would overwrite that patch."""
        for slot in self._slots.values():
            if slot.current is not None and not same_tensor(slot.param.data, slot.current):
                layers = sorted({c.layer for c in slot.contribs})
                raise PatchOrderError(
                    f"the parameter patched by {', '.join(layers)} was changed by a later patch; remove the later "
                    "patch(es) first, then change this patch's strengths"
                )

    def update(self, strengths: Sequence[float]) -> None:
        """Re-materialise every parameter for ``strengths`` (all computed and checked before any is swapped)."""
        if not self._slots:
            return
        self.check()
        values = self._values(strengths, [slot.original for slot in self._slots.values()])
        for slot, value in zip(self._slots.values(), values):
            slot.current = value
            slot.param.data = value

    def restore(self) -> None:
        """Put every original tensor back (the very object the parameter held before the patch)."""
        for slot in reversed(list(self._slots.values())):
            if slot.original is not None:
                slot.param.data = slot.original
            slot.original = slot.current = None
