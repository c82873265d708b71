"""The tiny Stable Diffusion 1.x pipeline (``family="sd1"``, ``--model tiny``): random weights from configs in code,
the offline byte-level CLIP tokenizer, no download."""

from __future__ import annotations

from typing import Any

import torch

from ._text import clip_tokenizer
from ._vae import tiny_vae_config

__all__ = ["TINY_TEXT", "TINY_UNET", "TINY_VAE", "build"]

TINY_UNET: dict[str, Any] = {
    "sample_size": 32,  # with the 2x VAE: 64x64 images by default
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TINY_VAE: dict[str, Any] = tiny_vae_config(4)
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 514,  # 256 bytes × {inner, word-final} + 2 specials
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "projection_dim": 32,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``StableDiffusionPipeline`` (about 1.5 M parameters): same ``seed`` -> identical weights.
    A 4-step 64x64 generation takes a fraction of a second on CPU; the images are noise-like."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Each model gets its own derived seed so that adding a component later does not change the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe
