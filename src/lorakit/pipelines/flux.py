"""The tiny FLUX.1 pipelines (``family="flux"``: ``FluxPipeline``; ``"flux-kontext"``: ``FluxKontextPipeline``),
one tiny guidance-distilled transformer config (FLUX.1-dev's shape: double and single blocks, guidance embedding),
a CLIP and a T5 text encoder, random weights from configs in code, the offline tokenizers, no download."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ._text import clip_tokenizer, t5_tokenizer
from ._vae import tiny_vae_config
from .sd1 import TINY_TEXT

__all__ = ["TINY_T5", "TINY_TRANSFORMER", "TINY_VAE", "build_flux", "build_flux_kontext"]

# 2 double + 2 single blocks of 2 heads × 16 (RoPE axes 4+6+6 = 16). The 2x VAE with 4 latent channels, packed
# 2x2 by the pipeline (16 channels in): 32x32 -> 8x8 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # T5 width
    "pooled_projection_dim": 32,  # CLIP pooled width
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_VAE: dict[str, Any] = tiny_vae_config(4, quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
TINY_T5: dict[str, Any] = {
    "vocab_size": 961,  # t5_tokenizer
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def _components(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(**TINY_T5)).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": t5_tokenizer(512),
        "transformer": transformer,
    }


def build_flux(seed: int = 0) -> Any:
    """A tiny random ``FluxPipeline`` (FLUX.1-dev shape): same ``seed`` -> identical weights."""
    from diffusers import FluxPipeline

    return FluxPipeline(**_components(seed))


@lru_cache(maxsize=1)
def _kontext_class() -> type:
    from diffusers import FluxKontextPipeline

    class TinyKontext(FluxKontextPipeline):
        # Stock Kontext resizes the output to max_area=1024² and the input image to a preferred ~1 MP size whatever
        # height/width say; at tiny sizes both would make a CPU step take minutes. Here both default to the
        # requested size; pass max_area/_auto_resize to get the stock behaviour.
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
            width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
            kwargs.setdefault("max_area", height * width)
            kwargs.setdefault("_auto_resize", False)
            return super().__call__(*args, **kwargs)

    # Saved folders and task lookups see the stock pipeline (model_index.json names FluxKontextPipeline).
    TinyKontext.__name__ = TinyKontext.__qualname__ = "FluxKontextPipeline"
    return TinyKontext


def build_flux_kontext(seed: int = 0) -> Any:
    """A tiny random ``FluxKontextPipeline`` (image editing: the input image's latents join the token sequence)
    with the transformer config of ``build_flux``. It is a subclass whose only change is that ``max_area`` and
    ``_auto_resize`` default to the requested ``height × width`` (stock Kontext generates ~1 MP whatever the size);
    ``isinstance(pipe, FluxKontextPipeline)`` holds and ``save_pretrained`` writes a stock Kontext folder."""
    return _kontext_class()(**_components(seed))
