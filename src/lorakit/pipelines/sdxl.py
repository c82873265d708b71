"""The tiny Stable Diffusion XL pipeline (``family="sdxl"``: ``StableDiffusionXLPipeline``): a UNet with SDXL's
text-time conditioning, two CLIP text encoders (the second ``CLIPTextModelWithProjection``), random weights from
configs in code, the offline byte-level CLIP tokenizer, no download. The invisible watermark is left out."""

from __future__ import annotations

from typing import Any

import torch

from ._text import clip_tokenizer
from .sd1 import TINY_TEXT, TINY_VAE

__all__ = ["TINY_UNET", "build"]

# SDXL's shape in small: no attention in the first block, more transformer layers deeper down, linear
# projections, and text_time conditioning on the pooled text (32) + 6 size/crop numbers × 8.
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,  # with the 2x VAE: 32x32 images by default
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 64,  # text_encoder (32) + text_encoder_2 (32), concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 8,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``StableDiffusionXLPipeline``: same ``seed`` -> identical weights."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
