"""The unfused path: a forward hook per patched module computing ``y = f(x) + Σ sᵢ hᵢ(x)``, weights
untouched; strengths are read at every forward so they can change live. Each ``hᵢ`` is the adapter's own
``delta_output`` (:mod:`lorakit.placement` picks the adapter for the target's rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedAdapterError
from ..families import Target
from ..model import Layer
from ..placement import bias_delta, is_transposed, oriented_weight, rows_adapter
from ..quant import proxy as quant_proxy

__all__ = ["HookState", "make_branch"]

Branch = Callable[[torch.Tensor], torch.Tensor]


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _bias_shape(module: nn.Module, x: torch.Tensor, n: int) -> tuple[int, ...]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (1, n, *([1] * (x.dim() - 2)))
    return (n,)


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

    def branch(x: torch.Tensor) -> torch.Tensor:
        h = None if adapter is None else adapter.delta_output(x, module)
        if bias is not None:
            key = (x.dtype, x.device)
            b = bias_cache.get(key)
            if b is None:
                b = bias_cache[key] = bias.to(dtype=x.dtype, device=x.device).reshape(_bias_shape(module, x, bias.numel()))
            h = b if h is None else h + b
        return h

    return branch


class HookState:
    """The branches of one patch on one module; the hook reads ``strengths`` at every call."""

    def __init__(self, module: nn.Module, strengths: Sequence[float]) -> None:
        self.module = module
        self.strengths = strengths
        self.branches: list[tuple[int, Branch, tuple[int, int] | None]] = []
        self.channel_dim = _channel_dim(module)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        y = output
        cloned = False
        for lora, branch, dst in self.branches:
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
