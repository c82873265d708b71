"""Lumina-Image 2.0 (NextDiT): the original / ComfyUI names (``diffusion_model.layers.0.attention.qkv``,
``attention.out``, ``feed_forward.w1``, ``adaLN_modulation.1``), kohya sd-scripts' flattened ones
(``lora_unet_layers_0_attention_qkv``) and diffusers / PEFT names onto diffusers' ``Lumina2Transformer2DModel``.

The original fused ``attention.qkv`` splits into ``attn.to_q/to_k/to_v`` by rows, sized from the model (the query
and key/value heads differ: 24 and 8 heads x 96 in the release); ``feed_forward.w1/w2/w3`` ->
``feed_forward.linear_1/2/3``; ``adaLN_modulation.1`` -> ``norm1.linear`` (noise refiner and main layers; the
context refiner has no modulation); ``attention_norm1`` -> ``norm1.norm`` (``norm1`` in the context refiner),
``attention_norm2`` -> ``norm2``; ``t_embedder.mlp.0/2`` and ``cap_embedder`` -> ``time_caption_embed.…``;
``final_layer.adaLN_modulation.1`` / ``final_layer.linear`` -> ``norm_out.linear_1`` / ``norm_out.linear_2``.
No modulation changes its row order (the final one is a scale only). The names follow diffusers' single-file
converter ``convert_lumina2_to_diffusers``; block counts and widths come from the model itself.

Lumina 2's original block names are Z-Image's too (both are NextDiT): a file whose blocks modulate through
``adaLN_modulation.1`` is Lumina 2's, ``adaLN_modulation.0`` Z-Image's; attention/MLP-only files tie on names and
the released widths decide (:mod:`lorakit.families.detect`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, Target, register_family
from .flux import _rows

__all__ = ["Lumina2"]

_STACKS = ("noise_refiner", "context_refiner", "layers")
# (original suffix inside a block, diffusers module inside the block); norm1 depends on the block (below)
_BLOCK = (
    ("attention.out", "attn.to_out.0"),
    ("attention.q_norm", "attn.norm_q"),
    ("attention.k_norm", "attn.norm_k"),
    ("feed_forward.w1", "feed_forward.linear_1"),
    ("feed_forward.w2", "feed_forward.linear_2"),
    ("feed_forward.w3", "feed_forward.linear_3"),
    ("adaLN_modulation.1", "norm1.linear"),
    ("attention_norm2", "norm2"),
)
_GLOBAL = (
    ("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
    ("cap_embedder.0", "time_caption_embed.caption_embedder.0"),
    ("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear_1"),
    ("final_layer.linear", "norm_out.linear_2"),
)
_STACK = r"(noise_refiner|context_refiner|layers)[._]\d+"
_FILE = re.compile(
    r"^(" + _STACK + r"([._](attention[._](qkv|out|[qk]_norm)|feed_forward[._](w[123]|linear_[123])"
    r"|adaLN_modulation[._]1|attention_norm[12]|ffn_norm[12]|attn[._](to_[qkv]|to_out[._]0|norm_[qk])"
    r"|norm1([._](linear|norm))?|norm2))?"
    r"|x_embedder|t_embedder[._]mlp[._][02]|cap_embedder[._][01]|final_layer[._](linear|adaLN_modulation[._]1)"
    r"|time_caption_embed[._](timestep_embedder[._]linear_[12]|caption_embedder[._][01])|norm_out[._]linear_[12])$"
)
# names only Z-Image has (its block modulation, its own diffusers spellings and per-patch-size heads)
_ZIMAGE = re.compile(
    r"^" + _STACK + r"[._](adaLN_modulation[._]0|attention[._](to[._]?[qkv]|to[._]?out([._]0)?|norm_[qk]))$"
    r"|^all_(final_layer|x_embedder)"
)


@register_family
class Lumina2(Family):
    name = "lumina2"

    model_class = "Lumina2Transformer2DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of Lumina 2 names; 0 when a Z-Image-only name is among them. Without a Lumina-only name the
        file's original names are Z-Image's too: the score then ties with Z-Image's and the widths decide."""
        paths = list(paths)
        if any(_ZIMAGE.search(p) for p in paths):
            return 0.0
        return super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for stack in _STACKS:
            for i in range(len(getattr(module, stack, None) or ())):
                block = f"{stack}.{i}"
                if f"{block}.attn.to_q" not in mods:
                    continue
                yield Alias(f"{block}.attention.qkv", _rows(component, f"{block}.attn", ("to_q", "to_k", "to_v"), mods))
                for orig, diff in _BLOCK:
                    if f"{block}.{diff}" in mods:
                        yield Alias(f"{block}.{orig}", Target(component, f"{block}.{diff}"))
                # modulated blocks wrap their first norm (LuminaRMSNormZero); the context refiner's is a plain norm
                norm1 = f"{block}.norm1.norm" if f"{block}.norm1.norm" in mods else f"{block}.norm1"
                if norm1 in mods:
                    yield Alias(f"{block}.attention_norm1", Target(component, norm1))
        for orig, diff in _GLOBAL:
            if diff in mods:
                yield Alias(orig, Target(component, diff))
