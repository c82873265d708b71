"""The tiny Stable Diffusion 3 pipeline (``family="sd3"``: ``StableDiffusion3Pipeline``): an MMDiT with two CLIP
text encoders (with projection) and a T5 encoder, random weights from configs in code, the offline CLIP and T5
tokenizers, no download."""

from __future__ import annotations

from typing import Any

import torch

from ._text import clip_tokenizer, t5_tokenizer
from ._vae import tiny_vae_config
from .sd1 import TINY_TEXT

__all__ = ["TINY_T5", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 2 joint blocks of 2 heads × 16. The two CLIPs (32 + 32) concatenate to the T5 width (64) = joint_attention_dim;
# their pooled outputs (32 + 32) make the pooled projection. 2x VAE + 2x2 patches: 32x32 -> 8x8 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
}
TINY_VAE: dict[str, Any] = tiny_vae_config(16, quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
TINY_T5: dict[str, Any] = {
    "vocab_size": 961,  # t5_tokenizer
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``StableDiffusion3Pipeline`` with all three text encoders: same ``seed`` -> identical weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline as Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    encoders = []
    for offset in (2, 3):
        torch.manual_seed(seed + offset)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)).eval())
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(T5Config(**TINY_T5)).eval()
    return Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=clip_tokenizer(),
        text_encoder_2=encoders[1],
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(512),
    )
