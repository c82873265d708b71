"""The tiny LTX-2 pipeline (``family="ltx2"``: diffusers' ``LTX2Pipeline``, text to video with audio): random weights
from configs in code for every component (video transformer with its audio stream, text connectors, video VAE, audio
VAE, vocoder), a tiny Gemma 3 text encoder (with a 1-layer SigLIP vision tower, as released) over the offline
byte-level tokenizer with Gemma's special tokens, no download.

The pipeline feeds every hidden state of Gemma (embeddings + each layer) to the connectors, so their input width is
``hidden x (layers + 1)``."""

from __future__ import annotations

from typing import Any

import torch

from ._text import chat_tokenizer

__all__ = ["GEMMA_SPECIALS", "TINY_AUDIO_VAE", "TINY_CONNECTORS", "TINY_GEMMA3", "TINY_TRANSFORMER", "TINY_VAE",
           "TINY_VOCODER", "build"]

# 2 blocks: video 2 heads x 8 (width 16), audio 2 heads x 4; captions 16 wide (the connectors' output). The video
# VAE is two 2x spatio-temporal stages with 4 latent channels: 32x32x5 -> 8x8x2 latents (128 video tokens).
TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
    "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
    "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8, "num_layers": 2,
    "qk_norm": "rms_norm_across_heads", "caption_channels": 16, "rope_double_precision": False, "rope_type": "split",
}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
# Text: 2 layers, width 16 (2 heads x 8, 1 kv head). Vision: SigLIP, 1 layer, 32 px in 8 px patches pooled to 4
# image tokens.
TINY_GEMMA3: dict[str, Any] = {
    "text_config": {
        "vocab_size": len(GEMMA_SPECIALS) + 958, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 8,
        "max_position_embeddings": 2048, "sliding_window": 64, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 2,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
    },
    "mm_tokens_per_image": 4, "boi_token_index": 6, "eoi_token_index": 7, "image_token_index": 8,
}
TINY_CONNECTORS: dict[str, Any] = {
    "caption_channels": 16, "text_proj_in_factor": 3, "video_connector_num_attention_heads": 2,
    "video_connector_attention_head_dim": 8, "video_connector_num_layers": 1,
    "video_connector_num_learnable_registers": None, "audio_connector_num_attention_heads": 2,
    "audio_connector_attention_head_dim": 8, "audio_connector_num_layers": 1,
    "audio_connector_num_learnable_registers": None, "connector_rope_base_seq_len": 32, "rope_double_precision": False,
    "rope_type": "split",
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8),
    "decoder_block_out_channels": (8, 8), "layers_per_block": (1, 1, 1), "decoder_layers_per_block": (1, 1, 1),
    "spatio_temporal_scaling": (True, True), "decoder_spatio_temporal_scaling": (True, True),
    "decoder_inject_noise": (False, False, False), "downsample_type": ("spatiotemporal", "spatiotemporal"),
    "upsample_residual": (False, False), "upsample_factor": (1, 1), "timestep_conditioning": False, "patch_size": 1, "patch_size_t": 1,
    "encoder_causal": True, "decoder_causal": False,
}
TINY_AUDIO_VAE: dict[str, Any] = {
    "base_channels": 4, "output_channels": 2, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": None,
    "in_channels": 2, "resolution": 32, "latent_channels": 2, "norm_type": "pixel", "causality_axis": "height",
    "dropout": 0.0, "mid_block_add_attention": False, "sample_rate": 16000, "mel_hop_length": 160, "is_causal": True,
    "mel_bins": 8,
}
TINY_VOCODER: dict[str, Any] = {
    "in_channels": 2 * 8, "hidden_channels": 32, "out_channels": 2, "upsample_kernel_sizes": [4, 4],
    "upsample_factors": [2, 2], "resnet_kernel_sizes": [3], "resnet_dilations": [[1, 3, 5]],
    "leaky_relu_negative_slope": 0.1, "output_sampling_rate": 16000,
}


def gemma_tokenizer(max_length: int = 1024) -> Any:
    """The offline byte-level tokenizer with Gemma's special tokens; BOS ``<bos>`` is prepended."""
    return chat_tokenizer(GEMMA_SPECIALS, max_length, pad="<pad>", bos="<bos>", eos="<eos>", add_bos=True)


def build(seed: int = 0) -> Any:
    """A tiny random ``LTX2Pipeline`` (video + audio): same ``seed`` -> identical weights. Call it with
    ``height=32, width=32, num_frames=5`` (frames 4k+1, sizes multiples of 4 here)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTX2Video(**TINY_VAE)
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(seed + 2)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(**TINY_GEMMA3)).eval()
    torch.manual_seed(seed + 3)
    connectors = LTX2TextConnectors(**TINY_CONNECTORS)
    torch.manual_seed(seed + 4)
    audio_vae = AutoencoderKLLTX2Audio(**TINY_AUDIO_VAE)
    torch.manual_seed(seed + 5)
    vocoder = LTX2Vocoder(**TINY_VOCODER)
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                        text_encoder=text_encoder, tokenizer=gemma_tokenizer(), connectors=connectors,
                        transformer=transformer, vocoder=vocoder)
