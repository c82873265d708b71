"""FLUX.2 (dev and Klein): BFL / ComfyUI / ai-toolkit (``diffusion_model.double_blocks.0.img_attn.qkv``), kohya
(the same names flattened, ``lora_unet_double_blocks_0_img_attn_qkv``) and LyCORIS / diffusers names onto
diffusers' ``Flux2Transformer2DModel``.

Unlike FLUX.1, FLUX.2 modulates globally (``double_stream_modulation_img.lin`` etc., diffusers ``.linear``), its
single blocks keep the fused ``linear1`` (diffusers ``attn.to_qkv_mlp_proj``, no split) and its double blocks'
fused ``qkv`` splits into ``to_q/to_k/to_v`` (``add_*_proj`` for text) by rows. ``final_layer.adaLN_modulation.1``
stores (shift, scale) and lands on ``norm_out.linear`` (scale, shift) with the halves swapped, as diffusers'
single-file converter does for the weights. Block counts and widths come from the model itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, RowTransform, Target, register_family
from .flux import _rows

__all__ = ["Flux2"]

# (BFL suffix inside double_blocks.N, diffusers module inside transformer_blocks.N)
_DOUBLE = (
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.linear_in"),
    ("img_mlp.2", "ff.linear_out"),
    ("txt_mlp.0", "ff_context.linear_in"),
    ("txt_mlp.2", "ff_context.linear_out"),
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
_SINGLE = (
    ("linear1", "attn.to_qkv_mlp_proj"),
    ("linear2", "attn.to_out"),
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
_GLOBAL = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    ("single_stream_modulation.lin", "single_stream_modulation.linear"),
    ("final_layer.linear", "proj_out"),
)
# Names only FLUX.2 has (BFL or diffusers spelling, dotted or flattened): its global modulations, its feed-forward
# and single-block projection names. ``double_blocks``/``single_blocks`` alone are FLUX.1's too.
_MARKER = re.compile(
    r"(^|[._])(double_stream_modulation_(img|txt)|single_stream_modulation|time_guidance_embed)([._]|$)"
    r"|[._]to_qkv_mlp_proj$|[._]ff(_context)?[._]linear_(in|out)$"
    r"|^single_transformer_blocks[._]\d+[._]attn[._]to_out$"
)
# BFL block names (dotted or flattened): FLUX.1 writes them too, so a file of these alone ties with FLUX.1 and the
# released models' shapes decide (families.detect)
_BFL = re.compile(
    r"^(double_blocks[._]\d+[._](img|txt)_(attn[._](qkv|proj|norm[._](query|key)_norm)|mlp[._][02])"
    r"|single_blocks[._]\d+[._](linear[12]|norm[._](query|key)_norm))$"
)
_FILE = re.compile(
    r"^(double_blocks[._]\d+[._](img|txt)_(attn[._](qkv|proj|norm[._](query|key)_norm)|mlp[._][02])"
    r"|single_blocks[._]\d+[._](linear[12]|norm[._](query|key)_norm)"
    r"|(s(ingle_trans)?|trans)?former_blocks[._]\d+[._].+"
    r"|img_in|txt_in|(time|guidance)_in[._](in|out)_layer|final_layer[._](linear|adaLN_modulation[._]1)|proj_out"
    r"|x_embedder|context_embedder|norm_out[._]linear|time_guidance_embed[._].+"
    r"|(double_stream_modulation_(img|txt)|single_stream_modulation)[._](lin|linear))$"
)


@register_family
class Flux2(Family):
    name = "flux2"

    model_class = "Flux2Transformer2DModel"
    file_pattern = _FILE
    #: released models detection fits BFL-named files against (FLUX.2-dev is 6144 wide, Klein 4B 3072 with a
    #: 3x SwiGLU feed-forward: FLUX.1's 3072 / 4x GELU shapes fit neither)
    variants = ("flux2-dev", "flux2-klein-4b")

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of FLUX.2 names when a name FLUX.1 lacks is among them, plus 0.5, so that FLUX.1's generic
        block-name score cannot tie with it. Without such a marker, the share of BFL block names
        (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``): a file of those alone ties with FLUX.1
        and the released models' shapes and block counts decide (ai-toolkit and ComfyUI write FLUX.2 LoRAs so)."""
        paths = list(paths)
        if not paths:
            return 0.0
        if not any(_MARKER.search(p) for p in paths):
            return sum(bool(_BFL.match(p)) for p in paths) / len(paths)
        return super().matches_file(paths) + 0.5

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for i in range(len(getattr(module, "transformer_blocks", []))):
            block = f"transformer_blocks.{i}"
            yield Alias(f"double_blocks.{i}.img_attn.qkv",
                        _rows(component, block, ("attn.to_q", "attn.to_k", "attn.to_v"), mods))
            yield Alias(f"double_blocks.{i}.txt_attn.qkv",
                        _rows(component, block, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), mods))
            for bfl, diff in _DOUBLE:
                if f"{block}.{diff}" in mods:
                    yield Alias(f"double_blocks.{i}.{bfl}", Target(component, f"{block}.{diff}"))
        for i in range(len(getattr(module, "single_transformer_blocks", []))):
            block = f"single_transformer_blocks.{i}"
            for bfl, diff in _SINGLE:
                if f"{block}.{diff}" in mods:
                    yield Alias(f"single_blocks.{i}.{bfl}", Target(component, f"{block}.{diff}"))
        for bfl, diff in _GLOBAL:
            if diff in mods:
                yield Alias(bfl, Target(component, diff))
        if "norm_out.linear" in mods:
            # BFL stores (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
            yield Alias("final_layer.adaLN_modulation.1",
                        Target(component, "norm_out.linear", transform=RowTransform.SWAP_SCALE_SHIFT))
        for name in mods:
            if name.startswith("transformer_blocks."):
                # some exports spell the double blocks ``sformer_blocks.N`` (diffusers accepts it as a legacy alias)
                yield Alias("sformer_blocks." + name[len("transformer_blocks."):], Target(component, name))
