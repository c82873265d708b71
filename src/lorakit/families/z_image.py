"""Z-Image (Turbo / Base): the original / ComfyUI names (``diffusion_model.layers.0.attention.qkv``,
``attention.out``, ``final_layer``, ``x_embedder``), kohya / musubi (the same flattened, or the diffusers names
flattened, ``lora_unet_layers_0_attention_to_q``), dot-spelled trainers (``attention.to.q``) and ai-toolkit /
diffusers names onto diffusers' ``ZImageTransformer2DModel``.

The original fused ``attention.qkv`` splits into ``to_q/to_k/to_v`` by rows (sizes from the model: Z-Image's
query and key/value heads may differ); ``final_layer``/``x_embedder`` are diffusers' ``all_final_layer.<p>-<f>`` /
``all_x_embedder.<p>-<f>`` for the model's first (the released) patch size. The modulation ``adaLN_modulation.0``
keeps its name and row order (diffusers' single-file converter renames nothing there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, Target, register_family
from .flux import _rows

__all__ = ["ZImage"]

_BLOCKS = ("layers", "noise_refiner", "context_refiner")
_FILE = re.compile(
    r"^((layers|noise_refiner|context_refiner)[._]\d+([._](attention[._](qkv|out|to[._][qkv]|to[._]out([._]0)?"
    r"|[qk]_norm|norm_[qk])|feed_forward[._]w[123]|adaLN_modulation[._]0|attention_norm[12]|ffn_norm[12]))?"
    r"|(all_)?final_layer([._]2-1)?[._](linear|adaLN_modulation[._]1)|(all_)?x_embedder([._]2-1)?"
    r"|t_embedder[._]mlp[._][02]|cap_embedder[._][01])$"
)
# Lumina 2's original names are Z-Image's (both NextDiT); its blocks modulate through ``adaLN_modulation.1``
_LUMINA = re.compile(r"^(layers|noise_refiner|context_refiner)[._]\d+[._]adaLN_modulation[._]1$")


@register_family
class ZImage(Family):
    name = "z-image"

    model_class = "ZImageTransformer2DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        paths = list(paths)
        if any(_LUMINA.match(p) for p in paths):
            return 0.0
        return super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for stack in _BLOCKS:
            for i in range(len(getattr(module, stack, []))):
                block = f"{stack}.{i}.attention"
                if f"{block}.to_q" not in mods:
                    continue
                yield Alias(f"{block}.qkv", _rows(component, block, ("to_q", "to_k", "to_v"), mods))
                yield Alias(f"{block}.out", Target(component, f"{block}.to_out.0"))
                yield Alias(f"{block}.q_norm", Target(component, f"{block}.norm_q"))
                yield Alias(f"{block}.k_norm", Target(component, f"{block}.norm_k"))
                for p in "qkv":  # dot-spelled trainers (Anime-Z): ``attention.to.q.lora.down.weight``
                    yield Alias(f"{block}.to.{p}", Target(component, f"{block}.to_{p}"))
                yield Alias(f"{block}.to.out.0", Target(component, f"{block}.to_out.0"))
        for original, table in (("final_layer", "all_final_layer"), ("x_embedder", "all_x_embedder")):
            keys = list(getattr(module, table, {}) or {})
            if not keys:
                continue
            head = f"{table}.{keys[0]}"  # the released patch size (2-1) comes first
            for name in mods:
                if name == head or name.startswith(head + "."):
                    yield Alias(original + name[len(head):], Target(component, name))
