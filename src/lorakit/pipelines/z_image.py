"""The tiny Z-Image pipeline (``family="z-image"``: diffusers' ``ZImagePipeline``): random weights from configs in
code, a tiny Qwen 3 text encoder over the offline byte-level tokenizer with a Qwen-style chat template, no
download. The template is a minimal ``<|im_start|>role ... <|im_end|>`` one (the released tokenizer's template
also renders tools and thinking blocks, which a prompt-only call does not use)."""

from __future__ import annotations

from typing import Any

import torch

from ._text import t5_tokenizer

__all__ = ["CHAT_TEMPLATE", "TINY_QWEN3", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 1 layer + 1 refiner of each kind, width 32 (4 heads x 8). The VAE is 8x: 32x32 -> 4x4 latents -> 2x2 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 4, "dim": 32, "n_layers": 1,
    "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "cap_feat_dim": 16, "axes_dims": [4, 2, 2],
    "axes_lens": [600, 32, 32],
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
TINY_QWEN3: dict[str, Any] = {
    "vocab_size": 961, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(seed: int = 0) -> Any:
    """A tiny random ``ZImagePipeline``: same ``seed`` -> identical weights; 32x32 is a valid size."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(**TINY_QWEN3)).eval()
    tokenizer = t5_tokenizer(512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return ZImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
