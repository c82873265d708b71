"""The one name resolver: which module (or rows of which tensor) each LoRA layer lands on.

A :class:`Resolver` works over live modules, meta-device modules (:mod:`lorakit.families.offline`) or a
checkpoint's key index (a checkpoint is a set of names and shapes: :meth:`Resolver.for_checkpoint`). Family
aliases come from :func:`lorakit.families.base.build_index`. ``components_of`` finds the components of an apply
target (pipeline, diffusers model, transformers text model, any module).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from ..formats.conventions import CHECKPOINT_PREFIXES, MODULE_HEADS, PEFT_COMPONENT, PREFIXES, WRAPPERS
from ..model import COMPONENTS, Layer, LoRA
from .base import NameIndex, RowTransform, Target, build_index

__all__ = ["GENERIC", "CheckpointNames", "Resolution", "Resolver", "Router", "checkpoint_router", "components_of"]

#: component key of a plain nn.Module: file layers of any component match it by module path
GENERIC = "generic"

# Pipeline attribute(s) holding each canonical component, first present wins.
_PIPELINE_PARTS: dict[str, tuple[str, ...]] = {
    canon: tuple(attr for attr, c in PEFT_COMPONENT.items() if c == canon) for canon in COMPONENTS
}


def _is_instance_of(obj: object, module_name: str, attr_path: str) -> bool:
    # Only consult a library already imported: if it is not, ``obj`` cannot be one of its classes,
    # and importing diffusers/transformers just to answer "no" would cost seconds.
    if module_name.split(".")[0] not in sys.modules:
        return False
    try:
        mod = __import__(module_name, fromlist=[attr_path])
        cls = getattr(mod, attr_path)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, cls)


def components_of(target: object, component: str | None = None) -> dict[str, nn.Module]:
    """``{component: module}`` for a diffusers pipeline (``denoiser``, ``text_encoder``...), a bare diffusers
    model (``denoiser``), a transformers model (``text_encoder``), or ``{GENERIC: module}`` for anything else.
    ``component=`` overrides the guess for a bare module."""
    if isinstance(target, Mapping):
        return {k: v for k, v in target.items() if isinstance(v, nn.Module)}
    if not isinstance(target, nn.Module):
        parts = getattr(target, "components", None)
        if not isinstance(parts, Mapping):
            raise TypeError(
                f"cannot apply a LoRA to a {type(target).__name__}; pass an nn.Module or a diffusers pipeline"
            )
        out: dict[str, nn.Module] = {}
        for canon, names in _PIPELINE_PARTS.items():
            for name in names:
                mod = parts.get(name)
                if isinstance(mod, nn.Module):
                    out[canon] = mod
                    break
        if not out:
            raise TypeError(f"{type(target).__name__} has no UNet, transformer or text encoder to apply a LoRA to")
        return out
    if component is not None:
        if component not in (*COMPONENTS, GENERIC):
            raise ValueError(f"component must be one of {', '.join((*COMPONENTS, GENERIC))}, got {component!r}")
        return {component: target}
    if _is_instance_of(target, "diffusers.models.modeling_utils", "ModelMixin"):
        return {"denoiser": target}
    if _is_instance_of(target, "transformers.modeling_utils", "PreTrainedModel"):
        return {"text_encoder": target}
    return {GENERIC: target}


@dataclasses.dataclass
class Resolution:
    """Where each layer of one LoRA lands: ``matched`` (layer, targets) in file order, and ``unmatched``."""

    matched: list[tuple[Layer, list[Target]]]
    unmatched: list[Layer]


def _candidates(path: str, component: str | None) -> list[str]:
    """The path as given, then without / with a leading prefix of ``component`` (or of any component)."""
    if path.endswith("_") and len(path) > 1 and not path.endswith("__"):
        # SimpleTuner writes kohya names with a trailing underscore (``..._attn_add_k_proj_``, ComfyUI #4347)
        return list(dict.fromkeys([path, *_candidates(path[:-1], component)]))
    if path.startswith("_") and len(path) > 1:
        # VideoX-Fun (Wan Fun) writes ``lora_unet__blocks_0_...``: one underscore too many after the prefix
        return list(dict.fromkeys([path, *_candidates(path.lstrip("_"), component)]))
    out = [path]
    comps = [component] if component in MODULE_HEADS else list(MODULE_HEADS)
    for comp in comps:
        for prefix in MODULE_HEADS[comp]:
            for sep in (".", "_"):
                head = prefix.replace(".", sep) + sep
                if path.startswith(head):
                    out.append(path[len(head) :])
    for comp in comps:
        for prefix in MODULE_HEADS[comp]:
            out.append(f"{prefix}.{path}")
            out.append(f"{prefix}.{path}".replace(".", "_"))
    return list(dict.fromkeys(out))


class Resolver:
    """Resolves the layers of LoRAs against one target's names (the index is built once).

    ``Resolver(components)``: live or meta-device modules (``{component: module}``), family aliases included.
    :meth:`for_checkpoint`: a checkpoint's tensor keys; names the checkpoint lacks are routed through the
    family's meta-device model onto the checkpoint's own tensors, rows and row order.
    """

    def __init__(self, components: Mapping[str, nn.Module]) -> None:
        self.components = dict(components)
        self.index: NameIndex = build_index(self.components)
        self.bare = len(self.components) == 1
        self.checkpoint: CheckpointNames | None = None
        self._route_factory: Callable[[], Router | None] | None = None
        self._router: Router | None = None
        # kohya numbers text encoders by model (FLUX: lora_te1_ = CLIP-L, lora_te3_ = T5), while a FLUX
        # pipeline holds T5 as text_encoder_2: a file's third encoder lands there when that one is a T5.
        self.remap: dict[str, str] = {}
        te2 = self.components.get("text_encoder_2")
        if "text_encoder_3" not in self.components and te2 is not None and type(te2).__name__.startswith(("T5", "UMT5")):
            self.remap["text_encoder_3"] = "text_encoder_2"

    @classmethod
    def for_checkpoint(
        cls, keys: Iterable[tuple[str | None, str]], route: Callable[[CheckpointNames], Router | None] | None = None
    ) -> Resolver:
        """A resolver over a checkpoint's ``(component, tensor key)`` names. ``route`` builds, on the first
        layer the names cannot place, a :class:`Router` through the family's meta-device model (e.g.
        ``lambda names: checkpoint_router(names, loras, folder_model)``)."""
        resolver = cls({})
        names = resolver.checkpoint = CheckpointNames(keys)
        resolver._route_factory = None if route is None else (lambda: route(names))
        return resolver

    @property
    def router(self) -> Router | None:
        """The family router of a checkpoint resolver (built on first use), else ``None``."""
        factory = self._route_factory
        if self._router is None and factory is not None:
            self._route_factory = None
            self._router = factory()
        return self._router

    def module(self, target: Target) -> nn.Module:
        """The live/meta module a target names."""
        return self.index.modules[target.component][target.module]

    def lookup(self, layer: Layer) -> list[Target] | None:
        if self.checkpoint is not None:
            return self.direct(layer) or self.routed(layer)
        if GENERIC in self.components:
            # A plain module: any component's layers match by path, with or without its prefix.
            return self._first(GENERIC, _candidates(layer.path, layer.component))
        if layer.component is not None:
            component = self.remap.get(layer.component, layer.component)
            if component in self.components:
                hit = self._first(component, _candidates(layer.path, layer.component))
                if hit:
                    return hit
            if not self.bare:
                return None  # a component this pipeline does not have: reported unmatched
        # No component in the file (PEFT without prefix) or a bare model: try the path as given.
        for comp in self.components:
            # a bare model only takes layers of its own component or of no component
            if layer.component is not None and layer.component != comp:
                continue
            hit = self._first(comp, dict.fromkeys([layer.path, *_candidates(layer.path, comp)[1:]]))
            if hit:
                return hit
        return None

    def _first(self, component: str, aliases: Iterable[str]) -> list[Target] | None:
        for alias in aliases:
            hit = self.index.lookup(component, alias)
            if hit:
                return hit
        return None

    def direct(self, layer: Layer) -> list[Target] | None:
        """Checkpoint resolvers: the module whose own name (prefixes aside) is the layer's, as one target."""
        hit = None if self.checkpoint is None else self.checkpoint.resolve(layer)
        return None if hit is None else [Target(hit[0], hit[1])]

    def routed(self, layer: Layer) -> list[Target] | None:
        """Checkpoint resolvers: targets through the family router (fused/split projections, other names)."""
        router = self.router if self.checkpoint is not None else None
        return None if router is None else router.route(layer)

    def resolve(self, lora: LoRA) -> Resolution:
        matched: list[tuple[Layer, list[Target]]] = []
        unmatched: list[Layer] = []
        for layer in lora.layers.values():
            targets = self.lookup(layer)
            if targets:
                matched.append((layer, targets))
            else:
                unmatched.append(layer)
        return Resolution(matched, unmatched)


# -- checkpoints: a set of names and shapes -----------------------------------------------------------------

#: prefixes a LoRA layer name may carry before the module path (every file prefix, PEFT's wrapper)
_LAYER_PREFIXES = tuple(dict.fromkeys((*WRAPPERS, *(p.text for p in PREFIXES))))


def _flat(name: str) -> str:
    return name.replace(".", "_")


class CheckpointNames:
    """A checkpoint's modules from its tensor keys: a module path ``P`` owns ``P.weight``/``P.bias``/... . Layers
    resolve by exact dotted names and kohya-flattened names, with or without ``diffusion_model.``-style
    prefixes on either side (:data:`~lorakit.formats.conventions.CHECKPOINT_PREFIXES`)."""

    def __init__(self, keys: Iterable[tuple[str | None, str]]) -> None:
        #: ``(component, module) -> {param name: tensor key}``
        self.params: dict[tuple[str | None, str], dict[str, str]] = {}
        self._alias: dict[str, list[tuple[str | None, str]]] = {}
        for component, key in keys:
            if "." not in key:
                continue
            module, param = key.rsplit(".", 1)
            self.params.setdefault((component, module), {})[param] = key
        for comp, module in self.params:
            names = {module, *(module[len(p):] for p in CHECKPOINT_PREFIXES if module.startswith(p))}
            for n in names:
                for alias in {n, _flat(n)}:
                    owners = self._alias.setdefault(alias, [])
                    if (comp, module) not in owners:
                        owners.append((comp, module))

    def bare_modules(self, components: tuple[str | None, ...] = (None, "denoiser")) -> list[str]:
        """Module paths of ``components`` without checkpoint prefixes (what family detection reads)."""
        out = []
        for comp, module in self.params:
            if comp in components:
                out.append(next((module[len(p):] for p in CHECKPOINT_PREFIXES if module.startswith(p)), module))
        return out

    def resolve(self, layer: Layer) -> tuple[str | None, str] | None:
        cands: list[str] = []
        for n in (layer.path, layer.name):
            if not n:
                continue
            cands.append(n)
            cands.extend(n[len(p):] for p in _LAYER_PREFIXES if n.startswith(p))
        for c in cands:
            for alias in (c, _flat(c)):
                hits = self._alias.get(alias)
                if hits:
                    return self._pick(hits, layer.component)
        return None

    @staticmethod
    def _pick(hits: list[tuple[str | None, str]], component: str | None) -> tuple[str | None, str]:
        if len(hits) > 1 and component is not None:
            hits = [h for h in hits if h[0] == component] or hits
        if len(hits) > 1:
            hits = [h for h in hits if h[0] in (None, "denoiser")] or hits
        return hits[0]


def _compose_transforms(first: RowTransform | None, second: RowTransform | None) -> RowTransform | None:
    # the only transform is swap_scale_shift, its own inverse: two swaps cancel
    if first and second:
        return None if first == second else first
    return first or second


@dataclasses.dataclass
class Router:
    """Routes a layer through a family's (meta-device) diffusers model onto a checkpoint's modules: a BFL-named
    LoRA onto a diffusers folder, a diffusers-named LoRA onto a BFL/SGM single file, a fused ``qkv`` onto split
    ``to_q/k/v`` and back. ``Target.module`` is then the checkpoint's module path and ``component`` its
    component (or ``None``). No weights are loaded to do so."""

    family: str
    model: Resolver  # over the meta-device model
    names: CheckpointNames
    #: diffusers module -> [(original alias, its Target)]
    reverse: dict[str, list[tuple[str, Target]]]

    @classmethod
    def build(cls, family: str, denoiser: nn.Module, names: CheckpointNames) -> Router:
        model = Resolver({"denoiser": denoiser})
        generic = set(model.index.modules["denoiser"])
        generic |= {_flat(name) for name in generic}
        reverse: dict[str, list[tuple[str, Target]]] = {}
        for comp, alias in model.index.aliases("denoiser"):
            if alias in generic:
                continue
            for t in model.index.lookup(comp, alias) or ():
                reverse.setdefault(t.module, []).append((alias, t))
        return cls(family, model, names, reverse)

    def route(self, layer: Layer) -> list[Target] | None:
        """Targets on checkpoint modules, or ``None`` when the layer has no place in this checkpoint."""
        model_targets = self.model.lookup(layer)
        if not model_targets:
            return None
        out: list[Target] = []
        for t in model_targets:
            placed = self._place(t)
            if placed is None:
                return None
            out.append(placed)
        return out

    def _place(self, t: Target) -> Target | None:
        hit = self._module(t.module)
        if hit is not None:
            return dataclasses.replace(t, component=hit[0], module=hit[1])
        for alias, ta in self.reverse.get(t.module, ()):
            hit = self._module(alias)
            if hit is None:
                continue
            if t.dst_rows is not None:
                return None  # a split file layer onto a part of a module that is itself part of a fused tensor
            inverse = {b: a for a, b in ta.param_map}
            param_map = tuple((a, inverse.get(b, b)) for a, b in (t.param_map or ())) or ta.param_map
            return Target(hit[0], hit[1], src_rows=t.src_rows, dst_rows=ta.src_rows,
                          transform=_compose_transforms(t.transform, ta.transform), param_map=param_map)
        return None

    def _module(self, name: str) -> tuple[str | None, str] | None:
        return self.names.resolve(Layer(name=name, component="denoiser", path=name))


def checkpoint_router(names: CheckpointNames, loras: Iterable[LoRA], folder_model: nn.Module | None) -> Router | None:
    """A router for the family of the checkpoint (from its tensor names), else of the LoRAs; ``None`` if no
    family is recognised. ``folder_model``: a diffusers folder's own denoiser on the meta device (exact sizes)."""
    from . import detect_family  # the package's registry, complete once the package is imported
    from .offline import FAMILY_NAMES, meta_components

    family = detect_family(names.bare_modules())
    for lora in loras:
        if family is not None:
            break
        family = detect_family(lora)
    if family is None or family not in FAMILY_NAMES:
        return None  # (a diffusers folder whose model no family knows needs no routing: names are its own)
    denoiser = folder_model if folder_model is not None else meta_components(family, ("denoiser",))["denoiser"]
    return Router.build(family, denoiser, names)
