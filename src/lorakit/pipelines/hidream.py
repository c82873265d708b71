"""The tiny HiDream-I1 pipeline (``family="hidream"``: diffusers' ``HiDreamImagePipeline``): random weights from
configs in code, its four text encoders (CLIP-L and CLIP-G with projection, T5, a Llama whose hidden states feed
every block) over the offline tokenizers, no download.

HiDream resizes every request to about ``default_sample_size x vae_scale_factor`` squared pixels (1024² for the
release); the tiny pipeline sets ``default_sample_size`` to 4 latents so that 32x32 stays 32x32."""

from __future__ import annotations

from typing import Any

import torch

from ._text import clip_tokenizer, t5_tokenizer

__all__ = ["TINY_CLIP", "TINY_LLAMA", "TINY_T5", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 1 double + 1 single stream block of 2 heads x 8, two routed experts (one active); captions: T5 32 wide, Llama 16
# wide (its 2 layers' hidden states, one per block and the last for the T5 stream); pooled CLIP-L + CLIP-G: 8 + 8.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": 8, "num_attention_heads": 2, "caption_channels": [32, 16], "text_emb_dim": 16,
    "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": (4, 2, 2), "max_resolution": (8, 8),
    "llama_layers": [0, 1],
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
TINY_CLIP: dict[str, Any] = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "max_position_embeddings": 128, "vocab_size": 514, "projection_dim": 8, "bos_token_id": 512, "eos_token_id": 513,
    "pad_token_id": 513,
}
TINY_T5: dict[str, Any] = {
    "vocab_size": 961, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 961, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 1,
    "attn_implementation": "eager",  # the pipeline asks for attentions, which sdpa cannot return (a warning per call)
}


def build(seed: int = 0) -> Any:
    """A tiny random ``HiDreamImagePipeline``: same ``seed`` -> identical weights; 32x32 is a valid size."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP)).eval()
    torch.manual_seed(seed + 3)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP)).eval()
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(**TINY_T5)).eval()
    torch.manual_seed(seed + 5)
    llama = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(128),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(128), text_encoder_3=t5, tokenizer_3=t5_tokenizer(128),
        text_encoder_4=llama, tokenizer_4=t5_tokenizer(128), transformer=transformer)
    pipe.default_sample_size = 32 // pipe.vae_scale_factor  # HiDream rescales requests to this many latents squared
    return pipe
