"""diffusers integration: the built-in tiny Stable Diffusion pipeline (random weights from configs in code,
an offline byte-level CLIP tokenizer, no download) and loading of local diffusers folders.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_pipeline", "tiny_pipeline"]

TINY_UNET: dict[str, Any] = {
    "sample_size": 32,  # with the 2x VAE: 64x64 images by default
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 32,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 514,  # 256 bytes × {inner, word-final} + 2 specials
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "projection_dim": 32,
}


def _byte_alphabet() -> list[str]:
    # CLIP/GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest map to 256+n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    """A per-process folder with a byte-level CLIP vocabulary and no merges (every byte is one token)."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    folder = Path(tempfile.mkdtemp(prefix="lorakit-tiny-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder)


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        os.path.join(_tokenizer_dir(), "vocab.json"),
        os.path.join(_tokenizer_dir(), "merges.txt"),
        model_max_length=77,
    )


def tiny_pipeline(seed: int = 0, *, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random ``StableDiffusionPipeline`` (about 1.5 M parameters): same ``seed`` -> identical weights.
    A 4-step 64x64 generation takes a fraction of a second on CPU; the images are noise-like."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Each model gets its own derived seed so that adding a component later does not change the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def load_pipeline(model: str, *, dtype: torch.dtype | None = None) -> Any:
    """``"tiny"`` -> :func:`tiny_pipeline`; otherwise a local diffusers folder (no download is attempted)."""
    if model == "tiny":
        return tiny_pipeline(0, dtype=dtype or torch.float32)
    path = Path(model)
    if not (path / "model_index.json").is_file():
        from .errors import SourceNotFoundError

        raise SourceNotFoundError(
            f"{model}: not a diffusers pipeline folder (no model_index.json); pass a folder written by "
            "save_pretrained, or 'tiny' for the built-in test pipeline"
        )
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
