"""The tiny Krea 2 pipeline (``family="krea2"``: diffusers' ``Krea2Pipeline``): random weights from configs in code,
a tiny Qwen3-VL text encoder over the offline byte-level tokenizer with Qwen's special tokens (as Qwen-Image), the
Qwen-Image VAE config of :mod:`.qwen_image`, no download.

The pipeline taps the text encoder's hidden states at ``text_encoder_select_layers`` (12 layers of Qwen3-VL-4B in
the release; here both layers of the tiny one) and drops the chat template's system prefix by token counts written
for the released tokenizer (34 prefix, 5 suffix tokens); the tiny pipeline sets both counts to what the offline
tokenizer makes of the same text."""

from __future__ import annotations

from typing import Any

import torch

from .qwen_image import QWEN_SPECIALS, TINY_VAE, qwen_tokenizer

__all__ = ["TINY_QWEN3_VL", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 2 blocks of 2 heads x 16 (1 kv head; RoPE axes 4+6+6); the text fusion stage reads the 2 tapped layers of the
# 16-wide encoder (1 layerwise + 1 refiner block). The VAE is 8x with 4 latent channels packed 2x2 (16 in):
# 32x32 -> 4x4 latents -> 2x2 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": 16, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 64, "timestep_embed_dim": 32, "text_hidden_dim": 16, "num_text_layers": 2,
    "text_num_attention_heads": 2, "text_num_key_value_heads": 2, "text_intermediate_size": 32,
    "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1, "axes_dims_rope": (4, 6, 6),
}
# Text: 2 layers, width 16 (2 heads x 8, 1 kv head), interleaved M-RoPE sections 2+1+1. Vision: 1 block (unused by
# the pipeline, present as in the release).
TINY_QWEN3_VL: dict[str, Any] = {
    "text_config": {
        "vocab_size": len(QWEN_SPECIALS) + 958, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                            "mrope_interleaved": True},
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
        "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
    },
    "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``Krea2Pipeline``: same ``seed`` -> identical weights; 32x32 is a valid size (multiples of
    16)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        Krea2Pipeline,
        Krea2Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(seed)
    transformer = Krea2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3VLModel(Qwen3VLConfig(**TINY_QWEN3_VL)).eval()
    tokenizer = qwen_tokenizer()
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, transformer=transformer, text_encoder_select_layers=(1, 2))
    pipe.prompt_template_encode_start_idx = len(tokenizer(pipe.prompt_template_encode_prefix).input_ids)
    pipe.prompt_template_encode_num_suffix_tokens = len(tokenizer(pipe.prompt_template_encode_suffix).input_ids)
    return pipe
