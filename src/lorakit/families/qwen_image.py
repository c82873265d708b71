"""Qwen-Image and Qwen-Image-Edit (one transformer): the released checkpoints already use diffusers'
``QwenImageTransformer2DModel`` names, so ComfyUI / ai-toolkit (``diffusion_model.transformer_blocks.0.attn.to_q``),
kohya / musubi (``lora_unet_transformer_blocks_0_attn_to_q``, flattened), PEFT with the adapter name kept
(``lora_A.default.weight``) and diffusers files all resolve through the model's own names, with no alias. This
module adds detection. No released Qwen-Image(-Edit) checkpoint fuses a projection, and the modulations
(``img_mod.1``/``txt_mod.1``, ``norm_out.linear``) keep their row order in every naming.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .base import Family, register_family

__all__ = ["QwenImage"]

_FILE = re.compile(
    r"^(transformer_blocks[._]\d+([._](attn[._](to_[qkv]|add_[qkv]_proj|to_out[._]0|to_add_out|norm_(added_)?[qk])"
    r"|(img|txt)_mod[._]1|(img|txt)_mlp[._]net[._](0[._]proj|2)))?"
    r"|img_in|txt_in|txt_norm|proj_out|norm_out[._]linear|time_text_embed[._]timestep_embedder[._]linear_[12])$"
)
# what only Qwen-Image names: its per-stream modulations and MLPs, its input projections and text norm
_MARKER = re.compile(r"(^|[._])((img|txt)_(mod|mlp)|img_in|txt_in|txt_norm)([._]|$)")


@register_family
class QwenImage(Family):
    name = "qwen-image"

    model_class = "QwenImageTransformer2DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of Qwen-Image names, when one name only Qwen-Image has is among them (an attention-only
        file in diffusers naming is also an SD3 or FLUX.1 file: ambiguous, 0)."""
        paths = list(paths)
        if not any(_MARKER.search(p) for p in paths):
            return 0.0
        return super().matches_file(paths)
