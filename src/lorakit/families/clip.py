"""CLIP text encoders: the old diffusers attention-processor names of text-encoder LoRAs (diffusers <= 0.16 files,
and diffusers' kohya conversion: ``self_attn.to_q_lora`` / ``to_out_lora``) onto CLIP's ``q_proj/k_proj/v_proj/
out_proj``. Only for CLIP text models: other diffusers models really have ``self_attn.to_q`` modules."""

from __future__ import annotations

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["CLIP"]

_OLD = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out"))


@register_family
class CLIP(Family):
    name = "clip"

    def matches_model(self, component: str, module: nn.Module) -> bool:
        return component.startswith("text_encoder") and type(module).__name__.startswith("CLIPText")

    def aliases(self, component: str, module: nn.Module):
        for name, _ in module.named_modules():
            for new, old in _OLD:
                if name.endswith(".self_attn." + new):
                    yield Alias(name[: -len(new)] + old, Target(component, name))
