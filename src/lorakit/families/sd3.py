"""SD3 / SD3.5 (MMDiT): the original checkpoint names (kohya ``lora_sd3.py`` ``lora_unet_joint_blocks_0_...``,
ComfyUI ``diffusion_model.joint_blocks.0...``) onto diffusers' ``SD3Transformer2DModel``. Detection scores the
diffusers names too (``transformer_blocks.0.attn.add_q_proj``, ``ff_context``): the widths of the released models
then tell an SD3 file from a FLUX.1 one (:mod:`lorakit.families.detect`).

Fused ``x_block.attn.qkv`` / ``context_block.attn.qkv`` / ``x_block.attn2.qkv`` split by rows onto
``to_q/to_k/to_v`` / ``add_q_proj/add_k_proj/add_v_proj`` / ``attn2.to_*``. The last block's context
modulation (2 chunks, stored (shift, scale)) and the final layer's are AdaLayerNormContinuous in diffusers
((scale, shift)): swapped. Blocks, dual-attention blocks and qk norms are read from the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, RowTransform, Target, register_family
from .flux import _rows

__all__ = ["SD3"]

_STREAM = {  # original stream -> (diffusers qkv modules, attention out, ff, modulation, qk norms)
    "x_block": (("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff", "norm1.linear",
                ("attn.norm_q", "attn.norm_k")),
    "context_block": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out", "ff_context",
                      "norm1_context.linear", ("attn.norm_added_q", "attn.norm_added_k")),
}
_GLOBAL = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_ORIGINAL = r"joint_blocks[._]\d+[._](x_block|context_block)|x_embedder|t_embedder|y_embedder|final_layer"
# diffusers' SD3Transformer2DModel names: joint blocks (no single-stream blocks, no per-block MLP names of Qwen-Image)
_DIFFUSERS_BLOCK = (
    r"transformer_blocks[._]\d+[._](attn[._](to_[qkv]|add_[qkv]_proj|to_out[._]0|to_add_out|norm_(q|k|added_q|added_k))"
    r"|attn2[._](to_[qkv]|to_out[._]0|norm_[qk])|ff(_context)?[._]net[._](0[._]proj|2)|norm1(_context)?[._]linear)$"
)
_DIFFUSERS = (
    _DIFFUSERS_BLOCK + r"|(pos_embed[._]proj|context_embedder|time_text_embed[._](timestep|text)_embedder[._]linear_[12]"
    r"|norm_out[._]linear|proj_out)$"
)
_FILE = re.compile(rf"^({_ORIGINAL}|{_DIFFUSERS})")
# at least one MMDiT joint block, in either naming (x_embedder / final_layer / proj_out alone are FLUX-like too)
_JOINT = re.compile(rf"^(joint_blocks[._]\d+[._](x_block|context_block)|{_DIFFUSERS_BLOCK})")
# a joint block's index in original (joint_blocks) or diffusers (transformer_blocks) names, dotted or flattened
_BLOCK = re.compile(r"(?:^|[._])(?:joint_blocks|transformer_blocks)[._](\d+)(?:[._]|$)")
_QK_NORM = re.compile(r"(?:^|[._])(?:ln_q|ln_k|norm_q|norm_k|norm_added_q|norm_added_k)(?:[._]|$)")


@register_family
class SD3(Family):
    name = "sd3"

    model_class = "SD3Transformer2DModel"
    file_pattern = _FILE

    #: SD3 Medium (24 blocks, width 1536), SD3.5 Medium (dual attention) and SD3.5 Large (38 blocks, 2432): a
    #: diffusers-named SD3 file has FLUX.1's, HunyuanVideo's and Qwen-Image's joint-attention names, and these widths
    #: tell it apart (families.detect)
    variants = ("sd3-medium", "sd3.5-medium", "sd3.5-large")

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of SD3 names, original or diffusers, when one MMDiT joint block is among them."""
        paths = list(paths)
        return super().matches_file(paths) if any(_JOINT.match(p) for p in paths) else 0.0

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for i in range(len(getattr(module, "transformer_blocks", []))):
            block = f"transformer_blocks.{i}"
            for stream, (qkv, out, ff, mod, norms) in _STREAM.items():
                orig = f"joint_blocks.{i}.{stream}"
                if all(f"{block}.{q}" in mods for q in qkv):
                    yield Alias(f"{orig}.attn.qkv", _rows(component, block, qkv, mods))
                if f"{block}.{out}" in mods:
                    yield Alias(f"{orig}.attn.proj", Target(component, f"{block}.{out}"))
                for fc, net in (("fc1", "net.0.proj"), ("fc2", "net.2")):
                    if f"{block}.{ff}.{net}" in mods:
                        yield Alias(f"{orig}.mlp.{fc}", Target(component, f"{block}.{ff}.{net}"))
                for ln, norm in zip(("ln_q", "ln_k"), norms):
                    if f"{block}.{norm}" in mods:
                        yield Alias(f"{orig}.attn.{ln}", Target(component, f"{block}.{norm}"))
                if f"{block}.{mod}" in mods:
                    # a context-pre-only last block has AdaLayerNormContinuous (scale, shift) in diffusers
                    swap = type(mods[f"{block}.{mod}".rsplit(".", 1)[0]]).__name__ == "AdaLayerNormContinuous"
                    yield Alias(f"{orig}.adaLN_modulation.1", Target(component, f"{block}.{mod}",
                                                               transform=RowTransform.SWAP_SCALE_SHIFT if swap else None))
            x2 = ("attn2.to_q", "attn2.to_k", "attn2.to_v")
            if all(f"{block}.{q}" in mods for q in x2):  # SD3.5 dual attention (MMDiT-X)
                orig = f"joint_blocks.{i}.x_block.attn2"
                yield Alias(f"{orig}.qkv", _rows(component, block, x2, mods))
                yield Alias(f"{orig}.proj", Target(component, f"{block}.attn2.to_out.0"))
                for ln, norm in (("ln_q", "attn2.norm_q"), ("ln_k", "attn2.norm_k")):
                    if f"{block}.{norm}" in mods:
                        yield Alias(f"{orig}.{ln}", Target(component, f"{block}.{norm}"))
        for orig, diff in _GLOBAL:
            if diff in mods:
                yield Alias(orig, Target(component, diff))
        if "norm_out.linear" in mods:
            yield Alias("final_layer.adaLN_modulation.1", Target(component, "norm_out.linear", transform=RowTransform.SWAP_SCALE_SHIFT))

    def notes(self, component: str, module: nn.Module, touched: set[str], paths: list[str]) -> list[str]:
        """Say which SD3 variant a LoRA's left-over layers belong to: deeper models (SD3.5 Large: 38 joint
        blocks, SD3 / SD3.5 Medium: 24), dual attention (SD3.5 Medium ``x_block.attn2``), qk norms (SD3.5)."""
        blocks = list(getattr(module, "transformer_blocks", []))
        if not blocks:
            return []
        out = []
        indices = {int(m.group(1)) for p in paths if (m := _BLOCK.search(p))}
        if indices and max(indices) >= len(blocks):
            out.append(f"the LoRA addresses joint block {max(indices)} but the model has {len(blocks)} "
                       f"(0-{len(blocks) - 1}): a LoRA for a deeper SD3 variant (SD3.5 Large has 38 joint blocks, "
                       "SD3 / SD3.5 Medium 24); its extra blocks get nothing")
        dual = {i for i, b in enumerate(blocks) if getattr(b, "attn2", None) is not None}
        wanted = sorted({int(m.group(1)) for p in paths if "attn2" in p and (m := _BLOCK.search(p))} - dual)
        if wanted:
            out.append(f"the LoRA has dual-attention layers (x_block.attn2, SD3.5 Medium) in joint block(s) "
                       f"{', '.join(map(str, wanted))}, where the model has none: they get nothing")
        if any(_QK_NORM.search(p) for p in paths) and getattr(blocks[0].attn, "norm_q", None) is None:
            out.append("the LoRA changes qk norms (ln_q / ln_k, SD3.5) but the model has none (SD3 Medium): "
                       "they get nothing")
        return out
