"""HiDream-I1 (Full / Dev / Fast) and HiDream-E1: diffusers' ``HiDreamImageTransformer2DModel`` keeps the original
module names (diffusers' single-file converter ``convert_hidream_transformer_to_diffusers`` only strips
``model.diffusion_model.``), so ComfyUI / ai-toolkit (``diffusion_model.double_stream_blocks.0.block.attn1.to_q``),
SimpleTuner (``transformer.…`` and LyCORIS ``lycoris_double_stream_blocks_0_block_attn1_to_q``), kohya-style
flattened (``lora_unet_…``) and diffusers / PEFT files all resolve through the model's own names.

There is no fused projection: the image and text streams have their own ``to_q/to_k/to_v/to_out`` (text:
``…_t``); the feed-forwards are SwiGLU ``w1/w2/w3`` (image: a mixture of experts ``ff_i.experts.N`` plus
``ff_i.shared_experts``; the router ``ff_i.gate`` is a parameter, not a layer). The modulations
(``adaLN_modulation.1`` per block, ``final_layer.adaLN_modulation.1``) keep their row order in every naming
(shift before scale in the original and in diffusers). This module adds detection; widths and counts come from
the model (16 double + 32 single blocks, 20 heads x 128 in the released models).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .base import Family, register_family

__all__ = ["HiDream"]

_FILE = re.compile(
    r"^((double|single)_stream_blocks[._]\d+[._]block([._](attn1[._](to_[qkv]|to_out)(_t)?|adaLN_modulation[._]1"
    r"|ff_[it]([._](shared_experts|experts[._]\d+))?[._]w[123]))?"
    r"|caption_projection[._]\d+[._]linear|x_embedder[._]proj|t_embedder[._]timestep_embedder[._]linear_[12]"
    r"|p_embedder[._]pooled_embedder[._]linear_[12]|final_layer[._](linear|adaLN_modulation[._]1))$"
)
# what only HiDream names: its stream-block lists (the ``.block`` wrapper) and its embedders
_MARKER = re.compile(r"(^|[._])((double|single)_stream_blocks|p_embedder|caption_projection[._]\d+)[._]")


@register_family
class HiDream(Family):
    name = "hidream"

    model_class = "HiDreamImageTransformer2DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of HiDream names, when a name only HiDream has is among them (``final_layer.linear`` alone
        is also FLUX.1's / Z-Image's)."""
        paths = list(paths)
        if not any(_MARKER.search(p) for p in paths):
            return 0.0
        return super().matches_file(paths)
