"""HunyuanVideo: the original / ComfyUI / diffusion-pipe names (``diffusion_model.double_blocks.0.img_attn_qkv``,
``transformer.double_blocks...``) and musubi-tuner's flattened ones (``lora_unet_double_blocks_0_img_attn_qkv``)
onto diffusers' ``HunyuanVideoTransformer3DModel``.

Fused projections split exactly by rows: ``img_attn_qkv`` -> ``attn.to_q/to_k/to_v``, ``txt_attn_qkv`` ->
``attn.add_q_proj/add_k_proj/add_v_proj``, ``single_blocks.N.linear1`` -> ``to_q/to_k/to_v/proj_mlp``, the token
refiner's ``self_attn_qkv`` -> ``attn.to_q/to_k/to_v`` (sizes read from the model). ``final_layer.adaLN_modulation.1``
stores (shift, scale), diffusers' ``norm_out.linear`` (scale, shift): swapped. The refiner's
``adaLN_modulation.1`` (two gates) keeps its order. Names follow diffusers' own converters
(``convert_hunyuan_video_transformer_to_diffusers``, ``_convert_hunyuan_video_lora_to_diffusers``).

The dotted names differ from FLUX.1's (``img_attn_qkv`` vs ``img_attn.qkv``), the flattened ones coincide
for attention layers, and the diffusers names are the same: where names tie, :mod:`lorakit.families.detect`
decides by the released models' block counts and widths.
"""

from __future__ import annotations

import re

from torch import nn

from .base import Alias, Family, RowTransform, Target, register_family
from .flux import DIFFUSERS_BLOCKS, _rows

__all__ = ["FILE", "HunyuanVideo"]

# (original name inside double_blocks.N, diffusers module inside transformer_blocks.N)
_DOUBLE = (
    ("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
    ("img_attn_q_norm", "attn.norm_q"), ("img_attn_k_norm", "attn.norm_k"),
    ("txt_attn_q_norm", "attn.norm_added_q"), ("txt_attn_k_norm", "attn.norm_added_k"),
    ("img_mod.linear", "norm1.linear"), ("txt_mod.linear", "norm1_context.linear"),
    ("img_mlp.fc1", "ff.net.0.proj"), ("img_mlp.fc2", "ff.net.2"),
    ("txt_mlp.fc1", "ff_context.net.0.proj"), ("txt_mlp.fc2", "ff_context.net.2"),
)
_SINGLE = (
    ("linear2", "proj_out"), ("q_norm", "attn.norm_q"), ("k_norm", "attn.norm_k"), ("modulation.linear", "norm.linear"),
)
_REFINER = (
    ("self_attn_proj", "attn.to_out.0"), ("norm1", "norm1"), ("norm2", "norm2"),
    ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm_out.linear"),
)
_GLOBAL = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
)

# the family's names: original (dotted or flattened) and diffusers (whose double/single blocks are FLUX.1's too)
FILE = re.compile(
    r"^(double_blocks[._]\d+[._]((img|txt)_attn_(qkv|proj|[qk]_norm)|(img|txt)_mod[._]linear|(img|txt)_mlp[._]fc[12])"
    r"|single_blocks[._]\d+[._](linear[12]|[qk]_norm|modulation[._]linear)"
    r"|txt_in[._](input_embedder|t_embedder[._]mlp[._][02]|c_embedder[._]linear_[12]|individual_token_refiner[._]blocks"
    r"[._]\d+[._](self_attn_(qkv|proj)|norm[12]|mlp[._]fc[12]|adaLN_modulation[._]1))"
    r"|img_in[._]proj|(time_in|guidance_in)[._]mlp[._][02]|vector_in[._](in|out)_layer"
    r"|final_layer[._](linear|adaLN_modulation[._]1)"
    r"|x_embedder[._]proj|context_embedder[._](proj_in|time_text_embed[._](timestep|text)_embedder[._]linear_[12]"
    r"|token_refiner[._]refiner_blocks[._]\d+[._](attn[._](to_[qkv]|to_out[._]0)|norm[12]|ff[._]net[._](0[._]proj|2)"
    r"|norm_out[._]linear))|" + DIFFUSERS_BLOCKS + r")$"
)


@register_family
class HunyuanVideo(Family):
    name = "hunyuanvideo"

    model_class = "HunyuanVideoTransformer3DModel"
    #: diffusers-named double/single blocks are FLUX.1's names too: such files tie, and the block counts of the
    #: released models decide (FLUX.1: 19 + 38 blocks, HunyuanVideo: 20 + 40)
    file_pattern = FILE

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for i in range(len(getattr(module, "transformer_blocks", []))):
            block, orig = f"transformer_blocks.{i}", f"double_blocks.{i}"
            yield Alias(f"{orig}.img_attn_qkv", _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v"), mods))
            yield Alias(f"{orig}.txt_attn_qkv",
                        _rows(component, block, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), mods))
            yield from _plain(component, orig, block, _DOUBLE, mods)
        for i in range(len(getattr(module, "single_transformer_blocks", []))):
            block, orig = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            yield Alias(f"{orig}.linear1",
                        _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), mods))
            yield from _plain(component, orig, block, _SINGLE, mods)
        refiner = getattr(getattr(module, "context_embedder", None), "token_refiner", None)
        for j in range(len(getattr(refiner, "refiner_blocks", []))):
            block = f"context_embedder.token_refiner.refiner_blocks.{j}"
            orig = f"txt_in.individual_token_refiner.blocks.{j}"
            yield Alias(f"{orig}.self_attn_qkv", _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v"), mods))
            yield from _plain(component, orig, block, _REFINER, mods)
        for orig, diff in _GLOBAL:
            if diff in mods:
                yield Alias(orig, Target(component, diff))
        if "norm_out.linear" in mods:
            yield Alias("final_layer.adaLN_modulation.1",
                        Target(component, "norm_out.linear", transform=RowTransform.SWAP_SCALE_SHIFT))


def _plain(component: str, orig: str, block: str, table, mods: dict[str, nn.Module]):
    for o, d in table:
        if f"{block}.{d}" in mods:
            yield Alias(f"{orig}.{o}", Target(component, f"{block}.{d}"))
