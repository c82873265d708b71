"""Trainable LoRA factors on a live denoiser: one :class:`LoRAModule` (``down``/``up`` parameters, scale
``alpha/r``) per target ``nn.Linear``/``nn.Conv2d``, added to the module's output by a forward hook, so module
names (and every resolver built on them) stay as they are. The base is never written."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MatchError, ShapeMismatchError
from ..families.base import Target

__all__ = ["Entry", "LoRAModule", "Network", "close_names", "matches", "shape_problem"]


def matches(pattern: str, *names: str) -> bool:
    """``pattern`` selects a name: a glob (``*``, ``?``, ``[``) matches the whole name; anything else matches
    whole dot- or underscore-separated segments (``attn2``, ``up_blocks.1``, ``to_out.0``) anywhere in it."""
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    for name in names:
        if f".{pattern}." in f".{name}.":
            return True
        flat = pattern.replace(".", "_")
        if f"_{flat}_" in f"_{name.replace('.', '_')}_":
            return True
    return False


def close_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Names near ``pattern`` for an error message: difflib on whole names and on their last segments."""
    names = sorted(set(names))
    hits = difflib.get_close_matches(pattern, names, n=n, cutoff=0.4)
    if len(hits) < n:
        tails = {}
        for name in names:
            for sep in (".", "_"):
                for k in (1, 2):
                    tails.setdefault(sep.join(name.split(sep)[-k:]), name)
        for tail in difflib.get_close_matches(pattern, list(tails), n=n, cutoff=0.5):
            if tails[tail] not in hits:
                hits.append(tails[tail])
    return hits[:n]


def no_match_error(what: str, pattern: str, names: Sequence[str]) -> MatchError:
    near = close_names(pattern, names)
    hint = f"; close names: {', '.join(near)}" if near else ""
    return MatchError(f"{what} pattern {pattern!r} matches no layer{hint} (lorakit inspect FILE --layer-names lists them)")


def shape_problem(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why ``up @ down`` cannot be a delta of ``module``'s weight, or ``None`` when it fits."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"a {type(module).__name__} target (only Linear and Conv2d train)"
    w = module.weight
    if up.shape[0] != w.shape[0]:
        return f"up has {up.shape[0]} output rows, the module's weight {tuple(w.shape)} has {w.shape[0]}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "a grouped convolution"
        cols = w.shape[1:] if down.dim() == 4 else (math.prod(w.shape[1:]),)
        if tuple(down.shape[1:]) != tuple(cols) or (down.dim() == 2 and w.shape[2:] != (1, 1)):
            return f"down {tuple(down.shape)} does not fit the conv weight {tuple(w.shape)}"
        return None
    if down.dim() != 2 or down.shape[1] != w.shape[1]:
        return f"down {tuple(down.shape)} does not fit the Linear weight {tuple(w.shape)}"
    return None


class LoRAModule(nn.Module):
    """``Δy = scale · up(down(x))`` for one Linear or Conv2d, factors kept in the file's own shapes."""

    def __init__(self, target: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> None:
        super().__init__()
        self.down = nn.Parameter(down.detach().float().clone())
        self.up = nn.Parameter(up.detach().float().clone())
        self.rank = int(down.shape[0])
        self.alpha = float(alpha) if alpha is not None else None
        self.scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        self.conv = isinstance(target, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = target.stride, target.padding, target.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else self.down.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if self.conv:
            down = self.down if self.down.dim() == 4 else self.down[:, :, None, None]
            up = self.up.reshape(self.up.shape[0], self.rank, 1, 1)
            h = F.conv2d(x, down.to(dtype), None, self.stride, self.padding, self.dilation)
            return F.conv2d(h, up.to(dtype)) * self.scale
        down = self.down if self.down.dtype == dtype else self.down.to(dtype)
        up = self.up if self.up.dim() == 2 else self.up.reshape(-1, self.rank)
        h = F.linear(F.linear(x, down), up if up.dtype == dtype else up.to(dtype))
        return h if self.scale == 1.0 else h * self.scale  # no extra op (and backward node) at scale 1


@dataclasses.dataclass
class Entry:
    """One LoRA layer of the run: its file name, where it sits, its factors, and whether it trains."""

    name: str
    target: Target
    module: LoRAModule
    trainable: bool


class Network(nn.Module):
    """The run's LoRA layers, hooked onto their modules by :meth:`attach` and off again by :meth:`detach`."""

    def __init__(self, entries: Sequence[Entry], modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.entries = list(entries)
        self.layers = nn.ModuleList(e.module for e in self.entries)
        self._targets = modules  # entry name -> live module
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for e in self.entries:
            e.module.requires_grad_(e.trainable)

    def attach(self) -> None:
        for e in self.entries:
            lora = e.module

            def hook(_mod: nn.Module, args: tuple, out: torch.Tensor, lora: LoRAModule = lora) -> torch.Tensor:
                return out + lora(args[0]).to(out.dtype)

            self._handles.append(self._targets[e.name].register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.entries if e.trainable for p in (e.module.down, e.module.up)]

    def count(self, trainable: bool) -> int:
        return sum(p.numel() for e in self.entries if e.trainable == trainable for p in (e.module.down, e.module.up))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Entry name -> detached ``(down, up)``."""
        return {e.name: (e.module.down.detach(), e.module.up.detach()) for e in self.entries}


def check_fits(name: str, module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
    problem = shape_problem(module, down, up)
    if problem is not None:
        raise ShapeMismatchError(f"{name}: {problem}")
