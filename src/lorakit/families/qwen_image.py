"""Qwen-Image and Qwen-Image-Edit (one transformer): the released checkpoints already use diffusers'
``QwenImageTransformer2DModel`` names, so ComfyUI / ai-toolkit (``diffusion_model.transformer_blocks.0.attn.to_q``),
kohya / musubi (``lora_unet_transformer_blocks_0_attn_to_q``, flattened), PEFT with the adapter name kept
(``lora_A.default.weight``) and diffusers files all resolve through the model's own names, with no alias. This
module adds detection. No released Qwen-Image(-Edit) checkpoint fuses a projection, and the modulations
(``img_mod.1``/``txt_mod.1``, ``norm_out.linear``) keep their row order in every naming.
"""

from __future__ import annotations

import re

from .base import Family, register_family

__all__ = ["QwenImage"]

_FILE = re.compile(
    r"^(transformer_blocks[._]\d+([._](attn[._](to_[qkv]|add_[qkv]_proj|to_out[._]0|to_add_out|norm_(added_)?[qk])"
    r"|(img|txt)_mod[._]1|(img|txt)_mlp[._]net[._](0[._]proj|2)))?"
    r"|img_in|txt_in|txt_norm|proj_out|norm_out[._]linear|time_text_embed[._]timestep_embedder[._]linear_[12])$"
)


@register_family
class QwenImage(Family):
    name = "qwen-image"

    model_class = "QwenImageTransformer2DModel"
    #: its joint-attention names are FLUX.1's, HunyuanVideo's and SD3's too: such files tie on names and the
    #: released models decide (60 blocks, no single-stream blocks, width 3072; ``transformer_blocks.19`` or deeper
    #: rules out FLUX.1)
    file_pattern = _FILE
    #: Qwen-Image LoRAs in diffusers names are as common as FLUX.1's (ai-toolkit, musubi, diffusers trainers): an
    #: attention-only file that fits both released models (width 3072, blocks 0-18) stays ambiguous, where the
    #: FLUX.1 prior alone would call it FLUX.1 (families.detect)
    prior = 1.0
