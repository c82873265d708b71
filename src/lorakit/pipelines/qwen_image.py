"""The tiny Qwen-Image pipelines (``family="qwen-image"``: diffusers' ``QwenImagePipeline``; ``"qwen-image-edit"``:
``QwenImageEditPipeline``): random weights from configs in code, a tiny Qwen2.5-VL text encoder (with a 1-block
vision tower for the edit pipeline's input image) over the offline byte-level chat tokenizer, no download.

Both pipelines wrap the prompt in a fixed chat template and drop the template's system prefix from the encoder's
hidden states by a token count written for the released tokenizer (34 / 64); the tiny pipelines set that count to
what the offline tokenizer makes of the same prefix, so the prompt's tokens are exactly what reaches the
transformer."""

from __future__ import annotations

from typing import Any

import torch

from ._text import chat_tokenizer

__all__ = ["QWEN_SPECIALS", "TINY_QWEN25_VL", "TINY_TRANSFORMER", "TINY_VAE", "build_qwen_image", "qwen_tokenizer"]

# 2 blocks of 2 heads x 16 (RoPE axes 4+6+6). The VAE (Wan-style, 8x) has 4 latent channels, packed 2x2 by the
# pipeline (16 channels in): 32x32 -> 4x4 latents -> 2x2 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6),
}
TINY_VAE: dict[str, Any] = {
    "base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True],
    "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 2.0, 1.0, 2.5],
}
# Qwen's special tokens, ids 0.. in this order (the released ids are 151643..): pad/bos <|endoftext|>.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Text: 2 layers, width 16 (2 heads x 8, 1 kv head), M-RoPE sections 2+1+1 = head_dim / 2. Vision: 1 block, width
# 16, patches 14 merged 2x2 into one token, out width 16 (the text width).
TINY_QWEN25_VL: dict[str, Any] = {
    "text_config": {
        "vocab_size": len(QWEN_SPECIALS) + 958, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
        "fullatt_block_indexes": [0], "window_size": 112,
    },
    "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
}


def qwen_tokenizer(max_length: int = 1024) -> Any:
    """The offline byte-level tokenizer with Qwen's special tokens (``<|im_start|>``, ``<|image_pad|>``, ...)."""
    return chat_tokenizer(QWEN_SPECIALS, max_length, pad="<|endoftext|>", bos="<|endoftext|>", eos="<|im_end|>")


def _prefix_tokens(tokenizer: Any, template: str, marker: str) -> int:
    """How many tokens ``template`` has before ``marker``: what the pipeline drops from the encoder's output."""
    return len(tokenizer(template.split(marker, 1)[0]).input_ids)


def _components(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_QWEN25_VL)).eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae, "text_encoder": text_encoder,
            "transformer": transformer}


def build_qwen_image(seed: int = 0) -> Any:
    """A tiny random ``QwenImagePipeline``: same ``seed`` -> identical weights; 32x32 is a valid size (multiples
    of 16)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(tokenizer=qwen_tokenizer(), **_components(seed))
    pipe.prompt_template_encode_start_idx = _prefix_tokens(pipe.tokenizer, pipe.prompt_template_encode, "{}")
    return pipe
