"""How a file's module path finds its target module: an alias index built from the target model's own
``named_modules()`` (ARCHITECTURE idea 4), to which model families add their extra namespaces.

Every module ``m`` of a component gets the aliases ``m`` (dotted) and ``m`` with dots flattened to
underscores (kohya). A :class:`Family` adds aliases for the names trainers use for the same modules
(SGM ``input_blocks_4_1_...``, BFL ``double_blocks.0.img_attn.qkv``, Wan native ``blocks.0.self_attn.q``),
possibly onto row slices (fused ``qkv`` in the file, separate ``to_q/to_k/to_v`` in the model, or the
reverse). Aliases are derived from the model's structure, never from hard-coded block counts.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from typing import ClassVar

from torch import nn

__all__ = [
    "FAMILIES", "Alias", "Family", "ModuleRef", "NameIndex", "RowTransform", "Target", "build_index", "register_family",
]


class RowTransform(str, enum.Enum):
    """A named row permutation of a delta (compares equal to its string value)."""

    #: the file stores ``(shift, scale)``, the model ``(scale, shift)``: swap the two halves of the rows
    SWAP_SCALE_SHIFT = "swap_scale_shift"

    def __str__(self) -> str:
        return self.value


class ModuleRef(str):
    """``"component:module"`` as reports print it, with its two parts kept (never split back from the text)."""

    component: str
    module: str

    def __new__(cls, component: str, module: str) -> ModuleRef:
        ref = super().__new__(cls, f"{component}:{module}")
        ref.component, ref.module = component, module
        return ref

    def __reduce__(self):  # pickles (Ray) rebuild from the parts
        return (ModuleRef, (self.component, self.module))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where (part of) a file layer's delta lands.

    ``src_rows=(a, b)``: only rows ``a:b`` of the layer's delta go here (file fused, model split).
    ``dst_rows=(a, b)``: the delta lands on rows ``a:b`` of this module's weight (file split, model fused).
    ``param``: the parameter patched by the layer's main delta (``weight``; ``modulation`` for Wan ``diff_m``
    targets are expressed through :attr:`Layer.params` and need no alias).
    ``transform``: a named row permutation applied to the delta first (e.g. ``"swap_scale_shift"``).
    ``param_map``: renames of :attr:`Layer.params` entries for this model, e.g. Wan native ``modulation``
    -> diffusers ``scale_shift_table``: ``(("modulation", "scale_shift_table"),)``.
    """

    component: str
    module: str
    src_rows: tuple[int, int] | None = None
    dst_rows: tuple[int, int] | None = None
    transform: RowTransform | None = None
    param_map: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.transform is not None and not isinstance(self.transform, RowTransform):
            try:
                object.__setattr__(self, "transform", RowTransform(self.transform))
            except ValueError:
                known = ", ".join(t.value for t in RowTransform)
                raise ValueError(f"unknown row transform {self.transform!r} for {self.module}; known: {known}") from None

    @property
    def ref(self) -> ModuleRef:
        return ModuleRef(self.component, self.module)


@dataclasses.dataclass(frozen=True, eq=False)
class Alias:
    """An extra name for one module, or for row slices of several (a fused projection).

    A generic name (the model's own module path) wins over an alias unless ``override``: e.g. Wan's
    ``blocks.N`` must carry ``param_map`` (``modulation`` -> ``scale_shift_table``)."""

    name: str
    targets: list[Target]
    override: bool = False

    def __init__(self, name: str, targets: Target | Iterable[Target], override: bool = False) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "targets", [targets] if isinstance(targets, Target) else list(targets))
        object.__setattr__(self, "override", bool(override))

    def __iter__(self):  # unpacks like the ``(name, targets, override)`` tuples families once yielded
        return iter((self.name, self.targets, self.override))

    @staticmethod
    def of(item: Alias | tuple) -> Alias:
        """An :class:`Alias` from itself or from a third-party family's ``(name, targets[, override])`` tuple."""
        return item if isinstance(item, Alias) else Alias(*item)


AliasLike = Alias | tuple


class NameIndex:
    """``(component, alias) -> [Target, ...]`` for one model or pipeline."""

    def __init__(self) -> None:
        self._map: dict[tuple[str, str], list[Target]] = {}
        self.modules: dict[str, dict[str, nn.Module]] = {}
        self.families: list[str] = []

    def add(self, component: str, alias: str, targets: Target | Iterable[Target], *, override: bool = False) -> None:
        targets = [targets] if isinstance(targets, Target) else list(targets)
        key = (component, alias)
        if override or key not in self._map:
            self._map[key] = targets

    def lookup(self, component: str, alias: str) -> list[Target] | None:
        return self._map.get((component, alias))

    def aliases(self, component: str | None = None) -> Iterable[tuple[str, str]]:
        return (k for k in self._map if component is None or k[0] == component)

    def __len__(self) -> int:
        return len(self._map)


class Family:
    """A model family. Subclasses set ``name`` and override what they need; register with
    :func:`register_family`. ``matches_model`` decides whether the family's aliases are added for a
    component; ``matches_file`` scores a file's layer paths for ``inspect`` (0 = not this family)."""

    name: ClassVar[str] = ""
    #: the diffusers class of the family's denoiser (the default ``matches_model``)
    model_class: ClassVar[str] = ""
    #: the family's own layer paths, dotted or flattened (the default ``matches_file``)
    file_pattern: ClassVar[re.Pattern[str] | None] = None
    #: breaks a detection tie that names, widths and block coverage cannot: the family whose files are far more
    #: common (FLUX.1 over HunyuanVideo for toy or partial files in their shared names) wins; equal priors stay
    #: ambiguous
    prior: ClassVar[float] = 0.0
    #: the released variants (:mod:`lorakit.families.offline` names) detection fits a file against when names
    #: tie; empty: the family's default variant (SD3 lists SD3 Medium, SD3.5 Medium and SD3.5 Large: their widths
    #: differ)
    variants: ClassVar[tuple[str, ...]] = ()

    def matches_model(self, component: str, module: nn.Module) -> bool:
        return bool(self.model_class) and component == "denoiser" and type(module).__name__ == self.model_class

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of ``paths`` that ``file_pattern`` recognises."""
        paths = list(paths)
        if self.file_pattern is None or not paths:
            return 0.0
        return sum(bool(self.file_pattern.match(p)) for p in paths) / len(paths)

    def evidence(self, evidence) -> float:
        """This family's score for a file (:class:`lorakit.families.detect.FileEvidence`: layer paths, shapes,
        text-encoder widths, metadata), 0 to 1; by default :meth:`matches_file` on the paths. Override to use
        shapes or metadata, or to score 0 where a name is another family's."""
        return self.matches_file(evidence.paths)

    def aliases(self, component: str, module: nn.Module) -> Iterable[AliasLike]:
        """Extra names (:class:`Alias`) for the modules of ``module`` (a component of this family)."""
        return ()

    def notes(self, component: str, module: nn.Module, touched: set[str], paths: list[str]) -> list[str]:
        """Human-readable remarks for an apply report: ``touched`` are the module names of ``module`` that
        received a delta, ``paths`` the file's layer paths (e.g. Wan: a T2V LoRA on an I2V model leaves the
        image cross-attention without a LoRA)."""
        return []


FAMILIES: list[Family] = []


def register_family(family: Family | type[Family]) -> Family:
    inst = family() if isinstance(family, type) else family
    if not inst.name or inst.name != inst.name.lower():
        raise ValueError(f"family name must be a non-empty lower-case name, got {inst.name!r}")
    if any(f.name == inst.name for f in FAMILIES):
        raise KeyError(f"a family named {inst.name!r} is already registered")
    FAMILIES.append(inst)
    return family


def build_index(components: Mapping[str, nn.Module], families: Iterable[Family] | None = None) -> NameIndex:
    """Index every module of every component under its dotted and flattened names, then the aliases of
    each family that recognises the component. Generic names win over family aliases on conflict.

    With the registered families (``families=None``) the alias map of a model is remembered: an apply, a remove
    and the next apply on the same modules reuse it (a SD1.5 UNet: ~60 ms of alias building per apply). The entry
    is keyed by the identity, type and name of every module of every component, read from one traversal, so any
    change of the module tree (a module added, replaced or renamed, a family registered) builds it again; it
    holds module names only, never modules."""
    index = NameIndex()
    mods_of = {component: dict(root.named_modules()) for component, root in components.items()}
    key = None
    if families is None:
        key = (len(FAMILIES), tuple(
            (component, tuple((name, id(m), type(m)) for name, m in mods.items())) for component, mods in mods_of.items()
        ))
        hit = _INDEX_CACHE.get(key)
        if hit is not None:
            _INDEX_CACHE[key] = _INDEX_CACHE.pop(key)  # most recently used last
            index._map, index.families = dict(hit[0]), list(hit[1])
            index.modules = mods_of
            return index
    for component, root in components.items():
        mods = mods_of[component]
        index.modules[component] = mods
        for name in mods:
            if not name:
                continue
            target = Target(component, name)
            index.add(component, name, target)
            index.add(component, name.replace(".", "_"), target)
        for family in FAMILIES if families is None else families:
            if family.matches_model(component, root):
                if family.name not in index.families:
                    index.families.append(family.name)
                for item in family.aliases(component, root):
                    alias = Alias.of(item)
                    index.add(component, alias.name, alias.targets, override=alias.override)
                    flat = alias.name.replace(".", "_")
                    if flat != alias.name:
                        index.add(component, flat, alias.targets, override=alias.override)
    if key is not None:
        _INDEX_CACHE[key] = (dict(index._map), tuple(index.families))
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    return index


#: the alias maps of the last few models indexed (:func:`build_index`); names and targets only
_INDEX_CACHE: dict[tuple, tuple[dict, tuple[str, ...]]] = {}
_INDEX_CACHE_SIZE = 4
