"""The tiny Lumina-Image 2.0 pipeline (``family="lumina2"``: diffusers' ``Lumina2Pipeline``): random weights from
configs in code, a tiny Gemma 2 text encoder over the offline byte-level tokenizer, no download."""

from __future__ import annotations

from typing import Any

import torch

from ._text import t5_tokenizer

__all__ = ["TINY_GEMMA2", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 1 block per stack, width 32 (4 query / 2 key-value heads x 8): the released model's unequal q and kv widths, so
# its fused qkv splits 32 / 16 / 16. The VAE is 8x: 32x32 -> 4x4 latents -> 2x2 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 4, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "num_layers": 1, "num_refiner_layers": 1,
    "num_attention_heads": 4, "num_kv_heads": 2, "multiple_of": 16, "axes_dim_rope": (4, 2, 2),
    "axes_lens": (300, 32, 32), "cap_feat_dim": 16,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
TINY_GEMMA2: dict[str, Any] = {
    "vocab_size": 961,  # t5_tokenizer: pad 0, eos 1, bytes and merged pairs
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``Lumina2Pipeline``: same ``seed`` -> identical weights; 32x32 is a valid size."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(Gemma2Config(**TINY_GEMMA2)).eval()
    return Lumina2Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=t5_tokenizer(256),
                           scheduler=FlowMatchEulerDiscreteScheduler())
