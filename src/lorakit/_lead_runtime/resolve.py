"""Find the components of a target (pipeline, diffusers model, text encoder, any nn.Module) and resolve
each LoRA layer onto their modules through the alias index of :mod:`lorakit.families`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from ..families import NameIndex, Target, build_index
from ..model import Layer, LoRA

__all__ = ["GENERIC", "Resolution", "components_of", "resolve"]

#: component key used for a plain nn.Module whose file paths are its own module names
GENERIC = "generic"
_PIPELINE_PARTS = {
    "denoiser": ("unet", "transformer", "prior"),
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
    "text_encoder_3": ("text_encoder_3",),
}


def components_of(target: object, component: str | None = None) -> dict[str, nn.Module]:
    """``{canonical component: module}`` for a diffusers pipeline, a bare component, or any module."""
    if isinstance(target, Mapping):
        return {k: v for k, v in target.items() if isinstance(v, nn.Module)}
    parts = getattr(target, "components", None)
    if isinstance(parts, Mapping) and not isinstance(target, nn.Module):
        out: dict[str, nn.Module] = {}
        for canon, names in _PIPELINE_PARTS.items():
            for name in names:
                mod = parts.get(name)
                if isinstance(mod, nn.Module):
                    out[canon] = mod
                    break
        if not out:
            raise TypeError(f"{type(target).__name__} has no UNet, transformer or text encoder to patch")
        return out
    if not isinstance(target, nn.Module):
        raise TypeError(f"cannot apply a LoRA to a {type(target).__name__}; pass an nn.Module or a diffusers pipeline")
    if component is not None:
        return {component: target}
    module_path = type(target).__module__
    if module_path.startswith("diffusers."):
        return {"denoiser": target}
    if module_path.startswith("transformers."):
        return {"text_encoder": target}
    return {GENERIC: target}


@dataclasses.dataclass
class Resolution:
    matched: list[tuple[Layer, list[Target]]]
    unmatched: list[Layer]


def _candidates(layer: Layer, components: Mapping[str, nn.Module]) -> list[str]:
    if GENERIC in components:
        return [GENERIC]
    if layer.component is not None:
        return [layer.component] if layer.component in components else []
    # no prefix in the file: try the denoiser first, then text encoders
    return [c for c in ("denoiser", "text_encoder", "text_encoder_2", "text_encoder_3") if c in components]


def resolve(lora: LoRA, components: Mapping[str, nn.Module], index: NameIndex | None = None) -> Resolution:
    index = index if index is not None else build_index(components)
    matched: list[tuple[Layer, list[Target]]] = []
    unmatched: list[Layer] = []
    for layer in lora:
        found = None
        for comp in _candidates(layer, components):
            found = index.lookup(comp, layer.path)
            if found is None and comp == GENERIC and "." in layer.path:
                # a generic module given a file with a component prefix it does not know
                found = index.lookup(comp, layer.path.split(".", 1)[1])
            if found:
                break
        if found:
            matched.append((layer, found))
        else:
            unmatched.append(layer)
    return Resolution(matched, unmatched)
