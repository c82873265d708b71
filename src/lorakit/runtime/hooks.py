"""The unfused path: a forward hook per patched module computing ``y = f(x) + Σ sᵢ hᵢ(x)``, weights
untouched; strengths are read at every forward so they can change live.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import LoRAWeights, NormDiff
from ..adapters.base import module_op
from ..errors import ShapeMismatchError, UnsupportedAdapterError
from ..families import Target
from ..model import Layer
from .fuse import _split_lora, bias_delta, weight_delta

__all__ = ["HookState", "make_branch"]

Branch = Callable[[torch.Tensor], torch.Tensor]


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _bias_shape(module: nn.Module, x: torch.Tensor, n: int) -> tuple[int, ...]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (1, n, *([1] * (x.dim() - 2)))
    return (n,)


def _check_low_rank(layer: Layer, lr: LoRAWeights, module: nn.Module, target: Target) -> None:
    """The fused path checks shapes when it reshapes ΔW; the low-rank path must check up front."""
    weight = module.weight
    rows = weight.shape[0] if target.dst_rows is None else target.dst_rows[1] - target.dst_rows[0]
    kernel = lr.down.shape[2:] if lr.mid is None else lr.mid.shape[2:]
    numel = lr.up.shape[0] * lr.down.shape[1] * math.prod(kernel)
    if lr.up.shape[0] != rows or numel != rows * weight[0].numel():
        raise ShapeMismatchError(
            f"{layer.name}: LoRA of shape up {tuple(lr.up.shape)} / down {tuple(lr.down.shape)} does not fit "
            f"{target.module}.weight {tuple(weight.shape)}" + (f" rows {target.dst_rows}" if target.dst_rows else "")
        )


def make_branch(layer: Layer, target: Target, module: nn.Module, base: torch.Tensor | None = None) -> Branch:
    """``h(x)`` for the rows of ``module``'s output this target covers (strength 1); ``base``: the rebuilt
    fused weight of a DoRA layer split over several modules (``fuse.fused_base``)."""
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        raise UnsupportedAdapterError(
            f"{layer.name}: no unfused path for a {type(module).__name__} target ({target.module}); "
            "apply this LoRA with mode='fuse'"
        )
    if layer.params or isinstance(layer.weight, NormDiff):
        raise UnsupportedAdapterError(
            f"{layer.name}: norm and parameter deltas ({', '.join(layer.kinds)}) have no unfused path; "
            "apply this LoRA with mode='fuse'"
        )
    weight_fn: Branch | None = None
    w = layer.weight
    low_rank = _split_lora(layer, target) if target.src_rows is not None else w
    groups_ok = getattr(module, "groups", 1) == 1
    if (
        isinstance(low_rank, LoRAWeights)
        and layer.dora is None
        and target.transform is None
        and groups_ok
        and (
            (isinstance(module, nn.Linear) and low_rank.down.dim() == 2 and low_rank.up.dim() == 2)
            or isinstance(module, nn.Conv2d)
        )
    ):
        lr = low_rank
        _check_low_rank(layer, lr, module, target)

        def weight_fn(x: torch.Tensor, lr: LoRAWeights = lr) -> torch.Tensor:
            return lr.delta_output(x, module)

    elif w is not None:
        # LoHa/LoKr/full/DoRA: the materialised delta (DoRA: ``W' − W`` against the weight at apply time),
        # cached per input dtype/device so each forward costs one extra GEMM/conv.
        delta = weight_delta(layer, target, module.weight.detach(), base)
        cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        if target.dst_rows is not None and not groups_ok:
            raise UnsupportedAdapterError(f"{layer.name}: row-split delta on a grouped conv; use mode='fuse'")

        def weight_fn(x: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
            key = (x.dtype, x.device)
            d = cache.get(key)
            if d is None:
                d = cache[key] = delta.to(dtype=x.dtype, device=x.device)
            return module_op(module, x, d)

    bias = bias_delta(layer, target)
    bias_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def branch(x: torch.Tensor) -> torch.Tensor:
        h = weight_fn(x) if weight_fn is not None else None
        if bias is not None:
            key = (x.dtype, x.device)
            b = bias_cache.get(key)
            if b is None:
                b = bias_cache[key] = bias.to(dtype=x.dtype, device=x.device).reshape(_bias_shape(module, x, bias.numel()))
            h = b if h is None else h + b
        assert h is not None
        return h

    if weight_fn is None and bias is None:
        raise UnsupportedAdapterError(f"{layer.name}: nothing to apply in hook mode ({', '.join(layer.kinds)})")
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

