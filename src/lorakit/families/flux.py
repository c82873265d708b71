"""FLUX.1: BFL / ComfyUI / kohya (flattened BFL) and XLabs names onto diffusers' ``FluxTransformer2DModel``.

Fused projections split exactly by rows: ``img_attn.qkv`` -> ``attn.to_q/to_k/to_v``; ``single_blocks.N.linear1``
-> ``to_q/to_k/to_v/proj_mlp`` (sizes read from the model); ``final_layer.adaLN_modulation.1`` ->
``norm_out.linear`` with scale/shift swapped. Block counts and sizes come from the model itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, RowTransform, Target, register_family

__all__ = ["DIFFUSERS_BLOCKS", "FILE", "Flux"]

# (BFL suffix inside a double block, diffusers module inside transformer_blocks.N)
_DOUBLE = (
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
    # XLabs processors
    ("processor.proj_lora1", "attn.to_out.0"),
    ("processor.proj_lora2", "attn.to_add_out"),
)
_SINGLE = (
    ("linear2", "proj_out"),
    ("modulation.lin", "norm.linear"),
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
    ("processor.proj_lora", "proj_out"),
)
_GLOBAL = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)


#: diffusers' double/single stream block names, shared by FLUX.1 and HunyuanVideo
DIFFUSERS_BLOCKS = (
    r"transformer_blocks[._]\d+[._](attn[._](to_[qkv]|add_[qkv]_proj|to_out[._]0|to_add_out|norm_(q|k|added_q|added_k))"
    r"|ff(_context)?[._]net[._](0[._]proj|2)|norm1(_context)?[._]linear)"
    r"|single_transformer_blocks[._]\d+[._](attn[._](to_[qkv]|norm_[qk])|proj_mlp|proj_out|norm[._]linear)"
    r"|time_text_embed[._](timestep|text|guidance)_embedder[._]linear_[12]|norm_out[._]linear|proj_out"
)
FILE = re.compile(
    r"^(double_blocks[._]\d+[._]((img|txt)_attn[._](qkv|proj|norm[._](query|key)_norm)|(img|txt)_mlp[._][02]"
    r"|(img|txt)_mod[._]lin|(processor[._])?(qkv|proj)_lora[12])"
    r"|single_blocks[._]\d+[._](linear[12]|modulation[._]lin|norm[._](query|key)_norm|(processor[._])?(qkv|proj)_lora)"
    r"|img_in|txt_in|(time_in|vector_in|guidance_in)[._](in|out)_layer|final_layer[._](linear|adaLN_modulation[._]1)"
    r"|x_embedder|context_embedder|" + DIFFUSERS_BLOCKS + r")$"
)


def _rows(component: str, prefix: str, names: Iterable[str], mods: dict[str, nn.Module]) -> list[Target]:
    """Consecutive row slices of a fused projection, one per module, sized by the modules' weights."""
    out, start = [], 0
    for name in names:
        size = mods[f"{prefix}.{name}"].weight.shape[0]
        out.append(Target(component, f"{prefix}.{name}", src_rows=(start, start + size)))
        start += size
    return out


def _xlabs(name: str) -> tuple[str, ...]:
    # XLabs keys sit under ".processor."; the format layer drops that level (old diffusers spelling).
    return (name, name.replace(".processor.", ".")) if ".processor." in name else (name,)


@register_family
class Flux(Family):
    name = "flux1"
    #: most files with double_blocks/single_blocks names are FLUX.1 LoRAs (see families.detect)
    prior = 1.0

    model_class = "FluxTransformer2DModel"

    file_pattern = FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of paths that are FLUX.1 names (BFL, XLabs or diffusers, dotted or flattened); the diffusers
        names are HunyuanVideo's too, so those files tie and the block counts decide (families.detect)."""
        return super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        doubles = len(getattr(module, "transformer_blocks", []))
        singles = len(getattr(module, "single_transformer_blocks", []))
        for i in range(doubles):
            block = f"transformer_blocks.{i}"
            img_qkv = _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v"), mods)
            txt_qkv = _rows(component, block, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), mods)
            for bfl in (f"double_blocks.{i}.img_attn.qkv", *_xlabs(f"double_blocks.{i}.processor.qkv_lora1")):
                yield Alias(bfl, img_qkv)
            for bfl in (f"double_blocks.{i}.txt_attn.qkv", *_xlabs(f"double_blocks.{i}.processor.qkv_lora2")):
                yield Alias(bfl, txt_qkv)
            for bfl, diff in _DOUBLE:
                if f"{block}.{diff}" in mods:
                    for alias in _xlabs(f"double_blocks.{i}.{bfl}"):
                        yield Alias(alias, Target(component, f"{block}.{diff}"))
        for i in range(singles):
            block = f"single_transformer_blocks.{i}"
            yield Alias(f"single_blocks.{i}.linear1", _rows(
                component, block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), mods
            ))
            for alias in _xlabs(f"single_blocks.{i}.processor.qkv_lora"):
                yield Alias(alias, _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v"), mods))
            for bfl, diff in _SINGLE:
                if f"{block}.{diff}" in mods:
                    for alias in _xlabs(f"single_blocks.{i}.{bfl}"):
                        yield Alias(alias, Target(component, f"{block}.{diff}"))
        for bfl, diff in _GLOBAL:
            if diff in mods:
                yield Alias(bfl, Target(component, diff))
        if "norm_out.linear" in mods:
            # BFL stores (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
            yield Alias("final_layer.adaLN_modulation.1", Target(component, "norm_out.linear", transform=RowTransform.SWAP_SCALE_SHIFT))
