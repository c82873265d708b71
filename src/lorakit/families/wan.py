"""Wan 2.1 / 2.2: the original (ComfyUI / ai-toolkit / diffusion-pipe ``diffusion_model.blocks.0.self_attn.q``,
DiffSynth without a prefix), musubi-tuner (``lora_unet_blocks_0_self_attn_q``, the same names flattened) and
LightX2V distill names (``diff``, ``diff_b``, ``diff_m``) onto diffusers' ``WanTransformer3DModel``.

Wan's original block calls its cross-attention norm ``norm3``; diffusers calls it ``norm2``. The per-block
``modulation`` (LightX2V ``diff_m``) is diffusers' ``blocks.N.scale_shift_table``, in the same
(shift, scale, gate) x 2 order, and the head's modulation is the model's top-level ``scale_shift_table``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["Wan"]

# (original name inside blocks.N, diffusers module inside blocks.N)
_BLOCK = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
)
_GLOBAL = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)
_MODULATION = (("modulation", "scale_shift_table"),)
# Wan's own names, dotted or flattened (musubi); Cosmos' ``self_attn.q_proj`` must not match
_FILE = re.compile(
    r"^_?(blocks[._]\d+([._](self_attn[._]([qkvo]|norm_[qk])|cross_attn[._]([qkvo]|k_img|v_img|norm_[qk]|norm_k_img)"
    r"|ffn[._][02]|norm3|modulation"  # original / musubi / LightX2V
    r"|attn[12][._](to_[qkv]|to_out[._]0|add_[kv]_proj)|ffn[._]net[._](0[._]proj|2)))?"  # diffusers
    r"|head([._]head|[._]modulation)?|time_projection[._]1|(text|time)_embedding[._][02]|img_emb[._]proj[._][0-4]"
    r"|patch_embedding)$"
)
# HunyuanDiT's diffusers names share ``blocks.N.attn1.to_q``; its feed-forward, skip and AdaLN layers are not Wan's
_NOT_WAN = re.compile(r"^blocks[._]\d+[._](ff[._]net|skip_linear|norm1[._]linear)")
_IMAGE = ("k_img", "v_img", "add_k_proj", "add_v_proj", "img_emb", "image_embedder")


@register_family
class Wan(Family):
    name = "wan"

    model_class = "WanTransformer3DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        paths = list(paths)
        if any(_NOT_WAN.match(p) for p in paths):
            return 0.0
        return super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for i in range(len(getattr(module, "blocks", []))):
            block = f"blocks.{i}"
            for orig, diff in _BLOCK:
                if f"{block}.{diff}" in mods:
                    yield Alias(f"{block}.{orig}", Target(component, f"{block}.{diff}"))
            if f"{block}.norm2" in mods:
                # original norm3 (the affine cross-attention norm) is diffusers' norm2; diffusers' own norm3 has no
                # weight, so taking its name over cannot misplace a diffusers-named file
                yield Alias(f"{block}.norm3", Target(component, f"{block}.norm2"), override=True)
            yield Alias(block, Target(component, block, param_map=_MODULATION), override=True)
        for orig, diff in _GLOBAL:
            if diff in mods:
                yield Alias(orig, Target(component, diff))
        # the head's modulation (LightX2V ``head.diff_m``) is the model's top-level scale_shift_table
        yield Alias("head", Target(component, "", param_map=_MODULATION), override=True)
        yield Alias("head.modulation", Target(component, "", param_map=_MODULATION))

    def notes(self, component: str, module: nn.Module, touched: set[str], paths: list[str]) -> list[str]:
        image = sorted(n for n in dict(module.named_modules()) if n.endswith(("attn2.add_k_proj", "attn2.add_v_proj")))
        if not image:
            return []
        if any(any(k in p for k in _IMAGE) for p in paths):
            return []
        return [f"T2V LoRA on an I2V model: the image cross-attention ({len(image)} layers: "
                "attn2.add_k_proj/add_v_proj, original cross_attn.k_img/v_img) gets no LoRA"]
