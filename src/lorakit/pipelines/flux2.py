"""The tiny FLUX.2 [dev] pipeline (``family="flux2"``: diffusers' ``Flux2Pipeline``): random weights from configs in
code, a tiny Mistral 3 text encoder (with a 1-layer Pixtral vision tower, as released) over the offline byte-level
chat tokenizer with Mistral's control tokens and a minimal Mistral chat template, no download.

The pipeline stacks the text encoder's hidden states 10, 20 and 30 (``text_encoder_out_layers``), so the tiny
Mistral has 30 layers, each 16 wide (~100k parameters in all)."""

from __future__ import annotations

from typing import Any

import torch

from ._text import chat_tokenizer
from ._vae import tiny_vae_config

__all__ = ["CHAT_TEMPLATE", "MISTRAL_SPECIALS", "TINY_MISTRAL3", "TINY_TRANSFORMER", "TINY_VAE", "build",
           "mistral_tokenizer"]

# 1 double + 1 single block of 2 heads x 16 (RoPE axes 4x4: t, h, w, sequence), guidance embedding. The 2x VAE with
# 4 latent channels, patchified 2x2 by the pipeline (16 channels in): 32x32 -> 16x16 latents -> 8x8 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 3 * 16, "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
}
TINY_VAE: dict[str, Any] = tiny_vae_config(4)
# Mistral's control tokens, ids 0.. in this order (the released ids 0-17 include unused tool tokens).
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
TINY_MISTRAL3: dict[str, Any] = {
    "text_config": {
        "model_type": "mistral", "vocab_size": len(MISTRAL_SPECIALS) + 958, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 6,
        "sliding_window": None,
    },
    "vision_config": {
        "model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "head_dim": 8, "image_size": 64, "patch_size": 16,
    },
    "image_token_index": 5, "spatial_merge_size": 2, "vision_feature_layer": -1,
}
# Mistral Small 3's format for what the pipeline sends (a system message and a user message, each a string or a list
# of typed parts); images as [IMG] (the processor expands it to the image's patch tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]{% endif %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[/INST]"
    "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def mistral_tokenizer(max_length: int = 1024) -> Any:
    """The offline byte-level tokenizer with Mistral's control tokens and :data:`CHAT_TEMPLATE`. The release puts a
    ``PixtralProcessor`` in the pipeline's ``tokenizer`` slot; transformers' Pixtral processor needs torchvision
    (not a lorakit dependency), and the pipeline only calls ``apply_chat_template`` on it for text, which a
    tokenizer does the same way."""
    tokenizer = chat_tokenizer(MISTRAL_SPECIALS, max_length, pad="<pad>", bos="<s>", eos="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(seed: int = 0) -> Any:
    """A tiny random ``Flux2Pipeline``: same ``seed`` -> identical weights; 32x32 is a valid size (multiples of
    4)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**TINY_VAE).eval()
    torch.manual_seed(seed + 2)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(**TINY_MISTRAL3)).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                         tokenizer=mistral_tokenizer(), transformer=transformer)
