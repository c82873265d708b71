"""The tiny LTX-Video pipeline (``family="ltx-video"``: diffusers' ``LTXPipeline``, text to video): random weights
from configs in code, the offline T5 tokenizer, no download."""

from __future__ import annotations

from typing import Any

import torch

from ._text import t5_tokenizer

__all__ = ["TINY_T5", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 1 block of 2 heads x 8 = width 16 over 8 latent channels. The VAE compresses 4x in space and time (two scaling
# stages): 32x32 -> 8x8 latents, 5 frames -> 2 latent frames.
TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": 8, "out_channels": 8, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
    "attention_head_dim": 8, "cross_attention_dim": 16, "num_layers": 1, "caption_channels": 32,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 8, "block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8), "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1, 1), "spatio_temporal_scaling": (True, True, False, False),
    "decoder_spatio_temporal_scaling": (True, True, False, False),
    "decoder_inject_noise": (False, False, False, False, False), "upsample_residual": (False, False, False, False),
    "upsample_factor": (1, 1, 1, 1), "timestep_conditioning": False, "patch_size": 1, "patch_size_t": 1,
    "encoder_causal": True, "decoder_causal": False,
}
TINY_T5: dict[str, Any] = {
    "vocab_size": 961,  # t5_tokenizer: 3 specials, 256 bytes, 702 merged pairs
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}


def build(seed: int = 0) -> Any:
    """A tiny random ``LTXPipeline``: same ``seed`` -> identical weights. Call it with ``height=32, width=32,
    num_frames=5`` (frames 4k+1, sizes multiples of 4 here; the released model wants 8k+1 frames and multiples of
    32)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(**TINY_VAE)
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(T5Config(**TINY_T5)).eval()
    return LTXPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=t5_tokenizer(128),
                       scheduler=FlowMatchEulerDiscreteScheduler())
