"""The adapter contract: two math methods (``delta_weight`` for fusing, ``delta_output`` for hooks) and
a validating registry through which built-in and third-party adapter types are declared as data.

Unfused contract (ComfyUI's "bypass"): ``y = f(x) + s * h(x)`` where ``h(x) = delta_output(x, module)``;
fused contract: ``W' = W + s * delta_weight(W.shape)``. Both include the file's ``alpha / rank``
scale and exclude the user strength ``s``, which the runtime applies once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError, IncompleteAdapterError, NonFiniteError, ShapeMismatchError

__all__ = ["ADAPTERS", "LowRank", "WeightAdapter", "adapter_for_fields", "register_adapter"]

#: picks (and possibly reorders) output rows of a row-major tensor: ``pick(t)`` has the target's rows of ``t``
RowPick = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """``ΔW.flatten(1) = scale · up @ down`` exactly: ``up [out, r]``, ``down [r, in·k…]`` (file dtype)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    #: the shape of one row of ΔW (``[in]``, or ``[in, kh, kw]`` for a conv): ``down`` unflattens to ``[r, *in_shape]``
    in_shape: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class WeightAdapter:
    """A delta on a module's ``weight``. Subclasses are frozen dataclasses whose tensor fields use the
    canonical field names listed in ``fields``; ``detect`` lists the fields whose presence selects
    the type (first registered match wins)."""

    kind: ClassVar[str] = ""
    #: canonical field names that select this adapter type when present
    detect: ClassVar[tuple[str, ...]] = ()
    #: every canonical field this adapter reads, required or optional
    fields: ClassVar[tuple[str, ...]] = ()
    #: fields that must be present once the type is selected
    required: ClassVar[tuple[str, ...]] = ()
    #: whether ``ΔW`` depends on the base weight itself (OFT, (IA)³, GLoRA, PEFT modules_to_save): such a type
    #: implements :meth:`delta_from_base`, and :func:`lorakit.placement.bind_layer` turns it into a plain
    #: full diff against the live weight before fusing or hooking (``W' = W + s·ΔW(W)``)
    needs_base: ClassVar[bool] = False

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_fields(cls, tensors: Mapping[str, torch.Tensor], *, name: str = "?") -> WeightAdapter:
        """Build from canonical field -> tensor (``alpha`` may be a 0-d tensor). ``name`` is used in errors."""
        missing = [f for f in cls.required if f not in tensors]
        if missing:
            have = ", ".join(sorted(tensors))
            raise IncompleteAdapterError(
                f"{name}: {cls.kind} adapter is missing {', '.join(missing)} (has {have}). "
                "The file is incomplete or truncated; pass strict=False to load the rest and report this layer."
            )
        kwargs = {}
        for field in cls.fields:
            value = tensors.get(field)
            if field == "alpha" and value is not None:
                value = _alpha_value(value, name)
            kwargs[field] = value
        obj = cls(**kwargs)
        try:
            obj.validate(name)
        except (IndexError, RuntimeError, TypeError) as exc:
            # shape checks index into dims a malformed file may not have: report it as a format problem
            shapes = {f: tuple(t.shape) for f, t in obj.tensors().items()}
            raise FormatError(f"{name}: tensor shapes {shapes} do not form a {cls.kind} adapter ({exc})") from exc
        return obj

    def validate(self, name: str) -> None:
        """Check shapes and finiteness; raise a FormatError subclass naming ``name``."""
        for field in self.fields:
            value = getattr(self, field)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not _all_finite(value):
                raise NonFiniteError(f"{name}.{field} contains NaN or Inf; the file is corrupt.")

    # -- what the file holds ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Canonical field -> tensor, without ``alpha`` (see :attr:`alpha`)."""
        return {f: getattr(self, f) for f in self.fields if f != "alpha" and getattr(self, f) is not None}

    @property
    def alpha(self) -> float | None:
        return getattr(self, "alpha", None) if "alpha" in self.fields else None

    @property
    def rank(self) -> int | None:
        """The low rank ``r`` (``None`` for full-matrix adapters)."""
        return None

    @property
    def scale(self) -> float:
        """``alpha / rank``, 1 when alpha is missing or the adapter is not low-rank."""
        alpha, rank = self.alpha, self.rank
        if alpha is None or not rank:
            return 1.0
        return float(alpha) / rank

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    def out_features(self) -> int:
        """Rows of the delta (output features/channels)."""
        raise NotImplementedError

    # -- optional capabilities (defaults: none; the callers fall back to the materialised delta) --------
    def low_rank(self) -> LowRank | None:
        """The exact factor form of ``ΔW``, or ``None`` when the type has none."""
        return None

    def slice_rows(self, pick: RowPick) -> WeightAdapter | None:
        """This adapter restricted to the output rows ``pick`` selects, or ``None`` when only the full delta can
        be cut (LoHa, LoKr: their rows do not factor)."""
        return None

    def delta_numel(self) -> int:
        """Elements of ``ΔW``; types that can tell it from their shapes do so without computing the delta."""
        return self.natural_delta().numel()

    @classmethod
    def from_delta(cls, delta: torch.Tensor) -> WeightAdapter | None:
        """An adapter of this type holding a dense delta exactly (full and norm diffs), else ``None``."""
        return None

    def delta_bias(self) -> torch.Tensor | None:
        """fp32 delta on the module's bias that comes with the weight delta (PEFT ``lora_B.bias``), or ``None``."""
        return None

    def delta_from_base(self, base: torch.Tensor) -> torch.Tensor:
        """fp32 ``ΔW`` given the base weight ``base`` (only for :attr:`needs_base` types)."""
        raise NotImplementedError(f"{self.kind} deltas do not depend on the base weight")

    def bias_from_base(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """fp32 delta on the module's bias given its current bias (only for :attr:`needs_base` types)."""
        return None

    def unfused_problem(self, module: nn.Module) -> str | None:
        """Why :meth:`delta_output` cannot run on ``module`` (checked before any hook is installed), or ``None``."""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D":
            return None  # Conv1D: transformers' GPT-2 linear, run by module_op as F.linear on the [out, in] delta
        return f"no unfused path for a {type(module).__name__} target"

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> WeightAdapter:
        changes = {
            f: getattr(self, f).to(device=device, dtype=dtype if getattr(self, f).is_floating_point() else None)
            for f in self.fields
            if isinstance(getattr(self, f), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    # -- the two math methods -------------------------------------------------------------------
    def natural_delta(self) -> torch.Tensor:
        """The delta in its natural shape (fp32), alpha/rank included. Implemented per type."""
        raise NotImplementedError

    def delta_weight(self, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """``ΔW`` in fp32 with ``alpha/rank`` applied, reshaped to ``shape`` when given."""
        try:
            delta = self.natural_delta()
        except (IndexError, RuntimeError) as exc:
            shapes = {f: tuple(t.shape) for f, t in self.tensors().items()}
            raise ShapeMismatchError(f"{self.kind} factors {shapes} cannot be combined: {exc}") from exc
        if shape is None:
            return delta
        return reshape_delta(delta, shape, self.kind)

    def delta_output(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``h(x)``: the output the delta adds to ``module(x)`` (for the rows this adapter covers). Default: run
        the module's op with ``ΔW``, materialised once per input dtype/device and cached on the adapter, so each
        forward costs one extra GEMM/conv."""
        key = (x.dtype, x.device)
        cache = self.__dict__.get("_materialised")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_materialised", cache)  # frozen dataclass: a cache, not a field
        delta = cache.get(key)
        if delta is None:
            shape = (self.out_features(), *module.weight.shape[1:])
            delta = cache[key] = self.delta_weight(shape).to(dtype=x.dtype, device=x.device)
        return module_op(module, x, delta)


def _alpha_value(value: torch.Tensor | float, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise FormatError(f"{name}.alpha must be a scalar, got shape {tuple(value.shape)}")
        value = float(value.reshape(()).item())
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteError(f"{name}.alpha is {value}; the file is corrupt.")
    return value


def reshape_delta(delta: torch.Tensor, shape: torch.Size | tuple[int, ...], kind: str = "") -> torch.Tensor:
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.numel() != _numel(shape):
        raise ShapeMismatchError(
            f"{kind or 'delta'} of shape {tuple(delta.shape)} does not fit a weight of shape {shape}"
        )
    return delta.reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(s) for s in shape)


def module_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply ``module``'s own operation to ``x`` with ``weight`` in place of its weight, without bias."""
    if isinstance(module, nn.Linear) or (weight.dim() == 2 and not isinstance(module, nn.modules.conv._ConvNd)):
        return F.linear(x, weight)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Conv3d):
        return F.conv3d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    raise FormatError(f"no unfused path for a {type(module).__name__}; apply this LoRA with mode='fuse'")


# -- registry ---------------------------------------------------------------------------------------

ADAPTERS: list[type[WeightAdapter]] = []


def register_adapter(cls: type[WeightAdapter]) -> type[WeightAdapter]:
    """Register an adapter type. Validates like PEFT's ``register_peft_method``: lower-case unique kind,
    detect fields unique across types, required fields a subset of fields. Usable as a decorator."""
    if not cls.kind or cls.kind != cls.kind.lower():
        raise ValueError(f"adapter kind must be a non-empty lower-case name, got {cls.kind!r}")
    if any(other.kind == cls.kind for other in ADAPTERS):
        raise KeyError(f"an adapter of kind {cls.kind!r} is already registered")
    if not cls.detect:
        raise ValueError(f"adapter {cls.kind!r} declares no detect fields")
    for other in ADAPTERS:
        if set(other.detect) & set(cls.detect):
            raise KeyError(f"detect fields {set(other.detect) & set(cls.detect)} of {cls.kind!r} already used by {other.kind!r}")
    if not set(cls.required) <= set(cls.fields) or not set(cls.detect) <= set(cls.fields):
        raise ValueError(f"adapter {cls.kind!r}: required and detect fields must be among its fields")
    ADAPTERS.append(cls)
    return cls


def adapter_for_fields(fields: set[str] | frozenset[str]) -> type[WeightAdapter] | None:
    """The first registered adapter type any of whose detect fields is present (first match wins)."""
    for cls in ADAPTERS:
        if any(f in fields for f in cls.detect):
            return cls
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: a finite sum proves it in one reduction pass (a NaN or an Inf makes the
    sum non-finite); only a sum that overflowed is checked element by element."""
    if t.numel() == 0:
        return True
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(torch.sum(t, dtype=acc))) or bool(torch.isfinite(t).all())
