"""The tiny HunyuanVideo pipeline (``family="hunyuanvideo"``: diffusers' ``HunyuanVideoPipeline``, text to video):
random weights from configs in code, a tiny Llama text encoder (the released one is LLaVA-Llama-3's language
model) over the offline byte-level chat tokenizer with Llama 3's header tokens, and a tiny CLIP-L for the pooled
prompt, no download.

The pipeline wraps the prompt in a chat template and crops the template's system prefix by a token count written
for the released tokenizer (``crop_start`` 95); the tiny pipeline's default template carries the count the offline
tokenizer gives the same prefix, so the prompt's tokens are exactly what reaches the transformer."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ._text import chat_tokenizer, clip_tokenizer
from .sd1 import TINY_TEXT

__all__ = ["LLAMA3_SPECIALS", "TINY_LLAMA", "TINY_TRANSFORMER", "TINY_VAE", "build"]

# 1 double-stream + 1 single-stream block + 1 token refiner, 2 heads x 16 (RoPE axes 4+6+6), guidance embedding
# (the release is guidance-distilled). The VAE is 8x spatial, 4x temporal with 4 latent channels: 32x32x5 ->
# 4x4x2 latents -> 2x2x2 tokens.
TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
    "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True,
    "text_embed_dim": 16, "pooled_projection_dim": TINY_TEXT["hidden_size"], "rope_axes_dim": (4, 6, 6),
}
TINY_VAE: dict[str, Any] = {
    "latent_channels": 4, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# 3 layers (the pipeline reads the hidden states 2 layers before the last), width 16 (2 heads x 8, 1 kv head).
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": len(LLAMA3_SPECIALS) + 958, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024, "bos_token_id": 0,
    "eos_token_id": 4, "pad_token_id": 1,
}


def llama3_tokenizer(max_length: int = 1024) -> Any:
    """The offline byte-level tokenizer with Llama 3's special tokens; BOS ``<|begin_of_text|>`` is prepended."""
    return chat_tokenizer(LLAMA3_SPECIALS, max_length, pad="<|end_of_text|>", bos="<|begin_of_text|>",
                          eos="<|eot_id|>", add_bos=True)


@lru_cache(maxsize=1)
def _pipeline_class() -> type:
    from diffusers import HunyuanVideoPipeline

    class TinyHunyuanVideo(HunyuanVideoPipeline):
        # Only change: prompt_template defaults to the stock template with this tokenizer's crop_start.
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("prompt_template", self.tiny_prompt_template)
            return super().__call__(*args, **kwargs)

    # Saved folders and task lookups see the stock pipeline (model_index.json names HunyuanVideoPipeline).
    TinyHunyuanVideo.__name__ = TinyHunyuanVideo.__qualname__ = "HunyuanVideoPipeline"
    return TinyHunyuanVideo


def build(seed: int = 0) -> Any:
    """A tiny random ``HunyuanVideoPipeline``: same ``seed`` -> identical weights. Call it with ``height=32,
    width=32, num_frames=5`` (frames 4k+1, sizes multiples of 16). It is a subclass whose only change is the
    default ``prompt_template`` (the stock text with this tokenizer's ``crop_start``); ``isinstance(pipe,
    HunyuanVideoPipeline)`` holds and ``save_pretrained`` writes a stock folder."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = LlamaModel(LlamaConfig(**TINY_LLAMA)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    tokenizer = llama3_tokenizer()
    pipe = _pipeline_class()(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                             tokenizer_2=clip_tokenizer())
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = len(tokenizer(template.split("{}", 1)[0]).input_ids)
    pipe.tiny_prompt_template = {"template": template, "crop_start": crop}
    return pipe
