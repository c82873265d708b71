"""The training objective of each denoiser family, read from the pipeline: ε- or v-prediction on a DDPM
schedule (SD 1/2, SDXL: ``x_t = add_noise(x0, ε, t)``) or flow matching (SD3, FLUX.1: ``x_t = (1-σ)·x0 + σ·ε``,
target ``ε - x0``). A :class:`Denoiser` turns images and captions into latents and conditioning, and runs the
model on noisy latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedAdapterError

__all__ = ["Denoiser", "denoiser_for"]


class Denoiser:
    """One family's training step pieces. ``flow``: flow matching (else DDPM ε/v)."""

    flow = False
    transformer = False

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self.model: nn.Module = pipe.transformer if self.transformer else pipe.unet
        self.vae = pipe.vae
        cfg = self.vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        sched = pipe.scheduler.config
        self.timesteps = int(sched.get("num_train_timesteps", 1000))
        self.prediction = sched.get("prediction_type", "epsilon") or "epsilon"
        self.sigma_shift = float(sched.get("shift", 1.0) or 1.0)
        if not self.flow:
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(sched)

    # -- inputs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the VAE posterior in the model's latent space (scaled and shifted)."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        mean = (dist.mean.float() - self.shift) * self.scaling
        return mean, dist.std.float() * self.scaling

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- the noising process ------------------------------------------------------------------------------
    def draw_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """σ in (0, 1) (flow matching, with the scheduler's shift) or integer timesteps in [0, T)."""
        if self.flow:
            sigma = torch.rand(n, generator=generator)
            s = self.sigma_shift
            return s * sigma / (1 + (s - 1) * sigma)
        return torch.randint(0, self.timesteps, (n,), generator=generator)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(x0.device)
        if self.flow:
            sigma = t.float().reshape(-1, *([1] * (x0.dim() - 1)))
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction == "v_prediction":
            return noisy, self.noise_scheduler.get_velocity(x0, noise, t)
        if self.prediction != "epsilon":
            raise UnsupportedAdapterError(f"training for prediction_type {self.prediction!r} is not supported")
        return noisy, noise

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class UNetDenoiser(Denoiser):
    """SD 1.x / 2.x: CLIP hidden states as cross-attention context."""

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(captions), self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        kwargs = {k: v.to(self.device, dtype) for k, v in cond.items() if k != "time_ids"}
        if "time_ids" in cond:
            kwargs = {"encoder_hidden_states": kwargs["encoder_hidden_states"],
                      "added_cond_kwargs": {"text_embeds": kwargs["text_embeds"], "time_ids": cond["time_ids"].to(self.device, dtype)}}
        return self.model(noisy.to(dtype), t.to(self.device), **kwargs, return_dict=False)[0].float()


class SDXLDenoiser(UNetDenoiser):
    """SDXL: both text encoders, pooled embeddings and size/crop time ids."""

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(captions), device=self.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        size = (noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor)
        proj = self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, torch.float32, text_encoder_projection_dim=proj)
        return super().predict(noisy, t, {**cond, "time_ids": ids.repeat(noisy.shape[0], 1)})


class SD3Denoiser(Denoiser):
    flow = True
    transformer = True

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(captions), None, None, device=self.device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        kwargs = {k: v.to(self.device, dtype) for k, v in cond.items()}
        timestep = (t.float() * self.timesteps).to(self.device)
        return self.model(hidden_states=noisy.to(dtype), timestep=timestep, **kwargs, return_dict=False)[0].float()


class FluxDenoiser(Denoiser):
    """FLUX.1: 2×2-packed latents with position ids; guidance-distilled models get a guidance input."""

    flow = True
    transformer = True
    guidance = 1.0

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(list(captions), None, device=self.device,
                                                          num_images_per_prompt=1, max_sequence_length=256)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        b, c, h, w = noisy.shape
        packed = self.pipe._pack_latents(noisy.to(dtype), b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, dtype)
        guidance = None
        if getattr(self.model.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.guidance, device=self.device, dtype=torch.float32)
        out = self.model(
            hidden_states=packed,
            timestep=t.float().to(self.device),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(self.device, dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, dtype),
            txt_ids=cond["txt_ids"][0].to(self.device) if cond["txt_ids"].dim() == 3 else cond["txt_ids"].to(self.device),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        vsf = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * vsf, w * vsf, vsf).float()


def denoiser_for(pipe: Any, device: torch.device) -> Denoiser:
    """The :class:`Denoiser` of ``pipe`` (by its denoiser class), or :class:`UnsupportedAdapterError`."""
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return (SDXLDenoiser if getattr(pipe, "text_encoder_2", None) is not None else UNetDenoiser)(pipe, device)
    name = type(transformer).__name__
    if name.startswith("FluxTransformer2D"):
        return FluxDenoiser(pipe, device)
    if name.startswith("SD3Transformer2D"):
        return SD3Denoiser(pipe, device)
    raise UnsupportedAdapterError(
        f"training a {type(pipe).__name__} ({name or 'no denoiser'}) is not supported yet; lorakit train covers "
        "SD 1.x/2.x, SDXL, SD3 and FLUX.1 pipelines"
    )
