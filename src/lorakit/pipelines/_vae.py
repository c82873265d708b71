"""The tiny 2-level image VAE (``AutoencoderKL``) config the tiny image pipelines share."""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_vae_config"]


def tiny_vae_config(latent_channels: int = 4, *, quant_conv: bool = True, **extra: Any) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs: 2 blocks of 16/32 channels at 32 px; ``quant_conv=False`` for the SD3/FLUX layout;
    ``extra`` (e.g. the released ``scaling_factor`` / ``shift_factor``) is added as given."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "latent_channels": latent_channels,
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 32,
    }
    if not quant_conv:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    config.update(extra)
    return config
