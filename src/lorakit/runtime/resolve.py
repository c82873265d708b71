"""Find the components of an apply target (pipeline, diffusers model, transformers text model, any module)
and resolve each LoRA layer onto their modules through the alias index of :mod:`lorakit.families`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping

from torch import nn

from ..families import NameIndex, Target, build_index
from ..model import COMPONENTS, Layer, LoRA

__all__ = ["GENERIC", "Resolution", "Resolver", "components_of"]

#: component key of a plain nn.Module: file layers of any component match it by module path
GENERIC = "generic"

# Pipeline attribute(s) holding each canonical component, first present wins.
_PIPELINE_PARTS: dict[str, tuple[str, ...]] = {
    "denoiser": ("unet", "transformer", "prior"),
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
    "text_encoder_3": ("text_encoder_3",),
}
# Leading prefixes files put before a component's module paths (``unet.down_blocks...``).
_PREFIXES: dict[str, tuple[str, ...]] = {
    "denoiser": ("unet", "transformer", "model.diffusion_model", "diffusion_model", "model"),
    # transformers 5 flattened CLIPTextModel (no ``text_model.``), while files still carry it
    "text_encoder": ("text_encoder", "te", "te1", "text_model"),
    "text_encoder_2": ("text_encoder_2", "te2", "text_model"),
    "text_encoder_3": ("text_encoder_3", "te3", "text_model"),
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
    if path.startswith("_") and len(path) > 1:
        # VideoX-Fun (Wan Fun) writes ``lora_unet__blocks_0_...``: one underscore too many after the prefix
        return list(dict.fromkeys([path, *_candidates(path.lstrip("_"), component)]))
    out = [path]
    comps = [component] if component in _PREFIXES else list(_PREFIXES)
    for comp in comps:
        for prefix in _PREFIXES[comp]:
            for sep in (".", "_"):
                head = prefix.replace(".", sep) + sep
                if path.startswith(head):
                    out.append(path[len(head) :])
    for comp in comps:
        for prefix in _PREFIXES[comp]:
            out.append(f"{prefix}.{path}")
            out.append(f"{prefix}.{path}".replace(".", "_"))
    return list(dict.fromkeys(out))


class Resolver:
    """Resolves the layers of LoRAs against one target's components (the index is built once)."""

    def __init__(self, components: Mapping[str, nn.Module]) -> None:
        self.components = dict(components)
        self.index: NameIndex = build_index(self.components)
        self.bare = len(self.components) == 1
        # kohya numbers text encoders by model (FLUX: lora_te1_ = CLIP-L, lora_te3_ = T5), while a FLUX
        # pipeline holds T5 as text_encoder_2: a file's third encoder lands there when that one is a T5.
        self.remap: dict[str, str] = {}
        te2 = self.components.get("text_encoder_2")
        if "text_encoder_3" not in self.components and te2 is not None and type(te2).__name__.startswith(("T5", "UMT5")):
            self.remap["text_encoder_3"] = "text_encoder_2"

    def lookup(self, layer: Layer) -> list[Target] | None:
        if GENERIC in self.components:
            # A plain module: any component's layers match by path, with or without its prefix.
            for alias in _candidates(layer.path, layer.component):
                hit = self.index.lookup(GENERIC, alias)
                if hit:
                    return hit
            return None
        if layer.component is not None:
            component = self.remap.get(layer.component, layer.component)
            if component in self.components:
                for alias in _candidates(layer.path, layer.component):
                    hit = self.index.lookup(component, alias)
                    if hit:
                        return hit
            if not self.bare:
                return None  # a component this pipeline does not have: reported unmatched
        # No component in the file (PEFT without prefix) or a bare model: try the path as given.
        for comp in self.components:
            if layer.component is not None and layer.component != comp and not self.bare:
                continue
            for alias in dict.fromkeys([layer.path, *_candidates(layer.path, comp)[1:]]):
                hit = self.index.lookup(comp, alias)
                if hit:
                    # a bare model only takes layers of its own component or of no component
                    if layer.component is None or layer.component == comp:
                        return hit
        return None

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
