"""The tiny Wan pipelines (``family="wan-t2v"``: Wan 2.1 ``WanPipeline``; ``"wan-i2v"``: ``WanImageToVideoPipeline``
with its tiny CLIP vision encoder; ``"wan22"``: a Wan 2.2 A14B-style ``WanPipeline`` with two experts): random weights
from configs in code, the offline UMT5 tokenizer, no download."""

from __future__ import annotations

from typing import Any

import torch

from ._text import t5_tokenizer

__all__ = ["TINY_TRANSFORMER", "TINY_UMT5", "TINY_VAE", "TINY_VISION", "WAN22_BOUNDARY", "build_wan22", "build_wan_i2v", "build_wan_t2v"]

# 2 blocks of 2 heads × 8 = width 16. The VAE is 8x spatial and 4x temporal: 32x32 -> 4x4 latents (2x2 tokens),
# 5 frames -> 2 latent frames.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
TINY_VAE: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_UMT5: dict[str, Any] = {
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
TINY_VISION: dict[str, Any] = {
    "hidden_size": 8,
    "projection_dim": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "intermediate_size": 16,
    "patch_size": 8,
}

def _common(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(**TINY_UMT5)).eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": t5_tokenizer(512),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }

def build_wan_t2v(seed: int = 0) -> Any:
    """A tiny random ``WanPipeline`` (text to video): same ``seed`` -> identical weights. Call it with
    ``height=32, width=32, num_frames=5`` (frames must be 4k+1; heights and widths multiples of 16)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
    return WanPipeline(transformer=transformer, **_common(seed))

def build_wan_i2v(seed: int = 0) -> Any:
    """A tiny random ``WanImageToVideoPipeline`` (Wan 2.1 I2V: image latents concatenated to the noise, 36 input
    channels, and a CLIP vision encoder whose features join the text in cross-attention). Needs ``image=PIL``."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**(TINY_TRANSFORMER | {"in_channels": 36, "image_dim": TINY_VISION["hidden_size"]}))
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    pipe = WanImageToVideoPipeline(
        transformer=transformer, image_encoder=image_encoder, image_processor=processor, **_common(seed)
    )
    return pipe



#: Wan 2.2 T2V A14B's ``boundary_ratio`` (its model_index.json): ``transformer`` (high noise) runs while the
#: timestep is >= 875, ``transformer_2`` (low noise) below.
WAN22_BOUNDARY = 0.875


def build_wan22(seed: int = 0) -> Any:
    """A tiny random Wan 2.2 A14B-style ``WanPipeline``: two experts of the Wan 2.1 architecture with their own
    weights (``transformer``: high noise, ``transformer_2``: low noise) and ``boundary_ratio`` 0.875, as the
    Wan2.2-T2V-A14B-Diffusers model_index has. With 2 steps the first runs on ``transformer`` (t=1000), the second on
    ``transformer_2`` (t below 875)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 4)
    transformer_2 = WanTransformer3DModel(**TINY_TRANSFORMER)
    return WanPipeline(transformer=transformer, transformer_2=transformer_2, boundary_ratio=WAN22_BOUNDARY,
                       **_common(seed))
