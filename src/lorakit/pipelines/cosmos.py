"""The tiny Cosmos Predict2 Video2World pipeline (``family="cosmos"``: ``Cosmos2VideoToWorldPipeline``): random
weights from configs in code, the offline T5 tokenizer, no download.

The NVIDIA guardrail (``cosmos_guardrail``'s ``CosmosSafetyChecker``) is left out: diffusers builds it whenever
``safety_checker=None`` and refuses to generate without one, so the tiny pipeline gets ``NoGuardrail``, a
pass-through stand-in that accepts every prompt and returns every video unchanged. It is for random test weights
only; a real Cosmos checkpoint should run with the real guardrail installed.

The transformer also leaves out the all-zero padding-mask channel of the real configs (``concat_padding_mask``),
whose resize needs torchvision; real Cosmos checkpoints need ``pip install torchvision`` for that reason."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ._text import t5_tokenizer

__all__ = ["TINY_T5", "TINY_TRANSFORMER", "build"]

# 2 blocks of 2 heads × 16; the Wan VAE of the tiny Wan pipelines (8x spatial, 4x temporal). max_size bounds the
# latent video (frames, height, width): up to 13 frames of 128x128.
TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": 16 + 1,  # latents + the conditioning mask channel
    "out_channels": 16,
    "num_attention_heads": 2,
    "attention_head_dim": 16,  # the 3D RoPE splits a head into t/h/w parts: 8 would leave h and w 2 dims (a 0 divisor)
    "num_layers": 2,
    "mlp_ratio": 2.0,
    "text_embed_dim": 32,
    "adaln_lora_dim": 4,
    "max_size": (4, 16, 16),
    "patch_size": (1, 2, 2),
    "rope_scale": (2.0, 1.0, 1.0),
    # The real models concatenate a padding mask channel, which diffusers resizes with torchvision (not a lorakit
    # dependency). Video2World's mask is all zeros, so leaving the channel out computes the same thing.
    "concat_padding_mask": False,
    "extra_pos_embed_type": "learnable",
}
TINY_T5: dict[str, Any] = {
    "vocab_size": 961,  # t5_tokenizer: 3 specials, 256 bytes, 702 merged pairs
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


@lru_cache(maxsize=1)
def _guardrail_class() -> type:  # defined on first use, so importing this module does not import diffusers
    from diffusers import ConfigMixin, ModelMixin

    class NoGuardrail(ModelMixin, ConfigMixin):
        """Stands in for ``cosmos_guardrail.CosmosSafetyChecker`` in the tiny pipeline: passes everything through."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # gives the module a device/dtype

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
            return frames

    return NoGuardrail


def build(seed: int = 0) -> Any:
    """A tiny random ``Cosmos2VideoToWorldPipeline`` (image or video in, video out) without the guardrail (see the
    module docstring): same ``seed`` -> identical weights. Call it with ``image=PIL, height=32, width=32,
    num_frames=5``."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2VideoToWorldPipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import T5Config, T5EncoderModel

    from .wan import TINY_VAE

    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(T5Config(**TINY_T5)).eval()
    return Cosmos2VideoToWorldPipeline(
        text_encoder=text_encoder,
        tokenizer=t5_tokenizer(512),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=_guardrail_class()(),
    )
