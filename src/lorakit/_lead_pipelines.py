"""The built-in tiny Stable Diffusion pipeline (random weights from configs in code, an offline byte-level
CLIP tokenizer, no download) and loading of local diffusers folders.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["load_pipeline", "tiny_pipeline"]

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    """A byte-level CLIP vocabulary without merges (every character is a token), written once per process."""
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    folder = Path(tempfile.mkdtemp(prefix="lorakit-tiny-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder)


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        os.path.join(_tokenizer_dir(), "vocab.json"),
        os.path.join(_tokenizer_dir(), "merges.txt"),
        model_max_length=32,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_pipeline(seed: int = 0, *, dtype: torch.dtype = torch.float32):
    """A tiny random-weight ``StableDiffusionPipeline``; the same ``seed`` gives identical weights.

    64x64 images, 4 latent channels, a 2-block UNet with cross-attention and a 2-layer CLIP text
    encoder: a few denoising steps take a fraction of a second on a CPU.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            )
        )
        # Random init leaves many weights at exactly 0 or 1 (norms, biases); perturb so LoRAs on any layer matter.
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.data.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``"tiny"`` (the built-in pipeline) or a local diffusers folder (``model_index.json`` inside)."""
    from .errors import SourceNotFoundError

    if str(model) == "tiny":
        return tiny_pipeline(seed, dtype=dtype)
    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise SourceNotFoundError(
            f"{model} is not a diffusers pipeline folder (no model_index.json); pass 'tiny' or a folder "
            "written by save_pretrained."
        )
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    return pipe
