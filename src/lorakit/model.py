"""The canonical, format-independent LoRA: one frozen :class:`Layer` per targeted module, plus the file's
metadata, its detected format and a :class:`LoadReport` that accounts for every key of the file.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .adapters import DoRA, WeightAdapter
from .errors import ShapeMismatchError

__all__ = ["COMPONENTS", "Layer", "LoRA", "LoadReport"]

#: Canonical component names. ``denoiser`` is the UNet or transformer of a pipeline.
COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """Everything a file holds for one module.

    ``name`` is the module's name as written in the file, prefix included and adapter suffix removed
    (e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in`` or ``unet.down_blocks.0.attentions.0.proj_in``);
    it is the key of :attr:`LoRA.layers`. ``component`` is one of :data:`COMPONENTS` or ``None`` when the
    prefix does not say; ``path`` is the module path inside that component, in the file's own namespace
    (``flat=True`` when the namespace flattened dots to underscores, as kohya does, so it must be resolved
    against a model's module names rather than decoded).
    """

    name: str
    component: str | None
    path: str
    flat: bool = False
    #: delta on ``<module>.weight`` (LoRA / LoHa / LoKr / full diff / norm)
    weight: WeightAdapter | None = None
    #: additive delta on ``<module>.bias`` not scaled by alpha (``diff_b``, ``b_norm``)
    bias: torch.Tensor | None = None
    #: DoRA magnitude applied on top of ``weight``
    dora: DoRA | None = None
    #: additive deltas on other parameters of the module, e.g. ``{"modulation": diff_m}``
    params: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: the file keys this layer was read from
    keys: tuple[str, ...] = ()
    #: the file spelling of the bias delta: "diff_b" or "b_norm"
    bias_key: str = "diff_b"

    # -- description --------------------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        """Adapter types in this layer, e.g. ``("lora", "dora")`` or ``("diff_b",)``."""
        out: list[str] = []
        if self.weight is not None:
            out.append(self.weight.kind)
        if self.dora is not None:
            out.append("dora")
        if self.bias is not None:
            out.append(self.bias_key)
        out.extend(f"diff_{p[0]}" if p == "modulation" else f"param:{p}" for p in self.params)
        return tuple(out)

    @property
    def rank(self) -> int | None:
        return None if self.weight is None else self.weight.rank

    @property
    def alpha(self) -> float | None:
        return None if self.weight is None else self.weight.alpha

    def parameters(self) -> int:
        n = 0 if self.weight is None else self.weight.parameters()
        n += 0 if self.bias is None else self.bias.numel()
        n += 0 if self.dora is None else self.dora.parameters()
        return n + sum(t.numel() for t in self.params.values())

    # -- math -----------------------------------------------------------------------------------------
    def delta_weight(self, base: torch.Tensor | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """fp32 ``ΔW`` for this module (strength not applied). DoRA needs ``base`` (the current weight)."""
        if self.weight is None:
            return None
        if base is not None:
            shape = tuple(base.shape)
        delta = self.weight.delta_weight(shape)
        if self.dora is not None:
            if base is None:
                raise ShapeMismatchError(f"{self.name}: a DoRA delta depends on the base weight; pass base=")
            delta = self.dora.apply(base.to(delta.device), delta)
        return delta

    def delta_bias(self) -> torch.Tensor | None:
        """fp32 ``Δbias`` (``diff_b``/``b_norm`` plus PEFT ``lora_B.bias · alpha/r``), or ``None``."""
        parts = []
        if self.weight is not None:
            value = self.weight.delta_bias()
            if value is not None:
                parts.append(value)
        if self.bias is not None:
            parts.append(self.bias.float())
        if not parts:
            return None
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.weight is not None:
            yield from self.weight.tensors().values()
        if self.bias is not None:
            yield self.bias
        if self.dora is not None:
            yield self.dora.magnitude
        yield from self.params.values()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Layer:
        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return dataclasses.replace(
            self,
            weight=None if self.weight is None else self.weight.to(dtype, device),
            bias=conv(self.bias),
            dora=None if self.dora is None else dataclasses.replace(self.dora, magnitude=conv(self.dora.magnitude)),
            params={k: conv(v) for k, v in self.params.items()},
        )


@dataclasses.dataclass
class LoadReport:
    """What happened to every key of the file: each key is in exactly one of ``consumed`` (its layer
    name), ``unsupported`` (recognised adapter types lorakit cannot compute yet, with the reason),
    ``invalid`` (broken keys skipped with ``strict=False``, with the reason), ``base_weights`` (a model
    checkpoint's own weights next to its LoRA layers, e.g. a Cosmos post-training checkpoint: expected, not a
    problem; ``lorakit split`` writes them apart) or ``unknown``."""

    consumed: dict[str, str] = dataclasses.field(default_factory=dict)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)
    invalid: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    base_weights: list[str] = dataclasses.field(default_factory=list)
    #: elements of the ``base_weights`` tensors
    base_parameters: int = 0

    @property
    def ok(self) -> bool:
        return not (self.unsupported or self.invalid or self.unknown)

    def problems(self) -> dict[str, str]:
        out = dict(self.unsupported)
        out.update(self.invalid)
        out.update({k: "unknown key (no naming convention recognises it)" for k in self.unknown})
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "consumed": len(self.consumed),
            "unsupported": dict(sorted(self.unsupported.items())),
            "invalid": dict(sorted(self.invalid.items())),
            "unknown": sorted(self.unknown),
            "base_weights": len(self.base_weights),
            "base_parameters": self.base_parameters,
        }


@dataclasses.dataclass
class LoRA:
    """A parsed LoRA file. ``layers`` maps the file's module name to its :class:`Layer`."""

    layers: dict[str, Layer]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    format: str = "unknown"
    source: str | None = None
    report: LoadReport = dataclasses.field(default_factory=LoadReport)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers.values())

    def adapter_types(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for layer in self.layers.values():
            counts.update(layer.kinds)
        return dict(sorted(counts.items()))

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items() if layer.rank is not None}

    def parameters(self) -> int:
        return sum(layer.parameters() for layer in self.layers.values())

    def components(self) -> dict[str | None, int]:
        return dict(Counter(layer.component for layer in self.layers.values()))

    def dtypes(self) -> dict[str, int]:
        return dict(Counter(str(t.dtype).replace("torch.", "") for layer in self for t in layer.tensors()))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoRA:
        return dataclasses.replace(self, layers={k: v.to(dtype, device) for k, v in self.layers.items()})

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks().values()))
        rank_txt = "-" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}")
        types = ", ".join(f"{k}={v}" for k, v in self.adapter_types().items())
        src = f" from {self.source}" if self.source else ""
        extra = "" if self.report.ok else f", {len(self.report.problems())} keys not loaded"
        return f"<LoRA {self.format}{src}: {len(self.layers)} layers ({types}), rank {rank_txt}, {self.parameters():,} params{extra}>"
