"""The training objective of each denoiser family, read from the pipeline: ε- or v-prediction on a DDPM
schedule (SD 1/2, SDXL: ``x_t = add_noise(x0, ε, t)``) or flow matching (SD3, FLUX.1, Wan 2.1, Cosmos Predict2:
``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``). A :class:`Denoiser` turns images and captions into latents and conditioning, and runs the
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
    video = False  # clips in, 5-D latents ``[B, C, F, H, W]``
    frames = 1  # default --frames of a video family

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self.model: nn.Module = pipe.transformer if self.transformer else pipe.unet
        self.vae = pipe.vae
        cfg = self.vae.config
        self.scaling = float(getattr(cfg, "scaling_factor", None) or 1.0)
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

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean squared error of each sample (subclasses drop conditioning frames)."""
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio at ``t``: ``ᾱ/(1-ᾱ)`` (DDPM) or ``((1-σ)/σ)²`` (flow matching)."""
        if self.flow:
            sigma = t.float().clamp(1e-6, 1 - 1e-6)
            return ((1 - sigma) / sigma) ** 2
        a = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        return a / (1 - a)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ weights that make the loss ``min(SNR, γ)·|x̂0 - x0|²`` (Hang et al. 2023): ``min(SNR, γ)/SNR``
        for ε, ``min(SNR, γ)/(SNR + 1)`` for v (diffusers' ``--snr_gamma``); for the flow velocity
        ``|v̂ - v|² = |x̂0 - x0|²/σ²`` and ``1/σ² = (√SNR + 1)²``, so ``min(SNR, γ)/(√SNR + 1)²``."""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.flow:
            return clipped / (snr.sqrt() + 1) ** 2
        if self.prediction == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr.clamp_min(1e-8)

    def spatial_factor(self) -> int:
        """Pixels per latent token side: the VAE's spatial factor times the UNet's downsamplings or the patch size."""
        pipe = self.pipe
        vae = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8))
        cfg = self.model.config
        if not self.transformer:
            return vae * 2 ** (len(cfg.block_out_channels) - 1)
        patch = getattr(cfg, "patch_size", None) or 2
        patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
        if type(self).__name__ == "FluxDenoiser":
            patch = 2  # 2x2 latent packing
        return vae * int(patch)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class UNetDenoiser(Denoiser):
    """SD 1.x / 2.x: CLIP hidden states as cross-attention context."""

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


class _VideoDenoiser(Denoiser):
    """The Wan-VAE video families: latents normalised per channel with the VAE's ``latents_mean``/``latents_std``
    (as the pipelines do before decoding), UMT5/T5 text embeddings padded to ``max_sequence_length``."""

    flow = True
    transformer = True
    video = True
    frames = 5
    max_sequence_length = 512
    sigma_data = 1.0

    def __init__(self, pipe: Any, device: torch.device) -> None:
        super().__init__(pipe, device)
        cfg = self.vae.config
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels [B, 3, F, H, W]`` -> ``(mean, std)`` of the posterior, normalised as the pipeline does."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        mean_, std_ = self.latents_mean.to(self.device), self.latents_std.to(self.device)
        mean = (dist.mean.float() - mean_) / std_ * self.sigma_data
        return mean, dist.std.float() / std_ * self.sigma_data

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=self.device,
                                         max_sequence_length=self.max_sequence_length)[0]
        return {"encoder_hidden_states": embeds}


class WanDenoiser(_VideoDenoiser):
    """Wan 2.1 (T2V): flow matching with the scheduler's ``shift`` (``flow_shift`` on UniPC configs), the
    transformer takes ``timestep = σ·1000``."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        super().__init__(pipe, device)
        sched = pipe.scheduler.config
        self.sigma_shift = float(sched.get("flow_shift") or sched.get("shift") or 1.0)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        timestep = (t.float() * self.timesteps).to(self.device)
        return self.model(hidden_states=noisy.to(self.device, dtype), timestep=timestep,
                          encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, dtype),
                          return_dict=False)[0].float()


class CosmosDenoiser(_VideoDenoiser):
    """Cosmos Predict2 Video2World. The pipeline runs an EDM schedule (σ in [σ_min, σ_max], latents scaled by
    ``sigma_data``) through a rectified-flow network: with ``t = σ/(σ+1)`` the transformer sees
    ``(1-t)·x0 + t·ε`` at timestep ``t`` and its output ``v`` gives ``x0 = x_t - t·v``, i.e. ``v = ε - x0``. So
    training is flow matching with ``t = σ/(1+σ)``, ``log σ ~ N(0, 1)`` (EDM's log-normal σ; a logit-normal
    ``t``) clamped to the scheduler's σ range. As in the pipeline called with an image, the first latent frame
    is the clean conditioning frame (condition mask 1, timestep ``σ_c/(σ_c+1)``, ``σ_c = 1e-4``) and is left out
    of the loss."""

    sigma_conditioning = 1e-4
    fps = 16

    def __init__(self, pipe: Any, device: torch.device) -> None:
        super().__init__(pipe, device)
        sched = pipe.scheduler.config
        self.sigma_min = float(sched.get("sigma_min", 0.002) or 0.002)
        self.sigma_max = float(sched.get("sigma_max", 80.0) or 80.0)
        self.sigma_data = float(sched.get("sigma_data", 1.0) or 1.0)

    def draw_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        sigma = torch.randn(n, generator=generator).exp().clamp(self.sigma_min, self.sigma_max)
        return sigma / (sigma + 1)

    @staticmethod
    def _conditioned(x: torch.Tensor) -> int:
        return 1 if x.shape[2] > 1 else 0  # a single latent frame: nothing left to predict after conditioning

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, target = super().noisy_and_target(x0, noise, t)
        k = self._conditioned(x0)
        if k:
            noisy = torch.cat([x0[:, :, :k], noisy[:, :, k:]], dim=2)
        return noisy, target

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = self._conditioned(target)
        return super().per_sample_loss(pred[:, :, k:], target[:, :, k:])

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        b, _, f, h, w = noisy.shape
        k = self._conditioned(noisy)
        indicator = torch.zeros(1, 1, f, 1, 1, device=self.device)
        indicator[:, :, :k] = 1.0
        t_cond = self.sigma_conditioning / (self.sigma_conditioning + 1)
        timestep = indicator * t_cond + (1 - indicator) * t.float().to(self.device).view(b, 1, 1, 1, 1)
        mask = indicator.expand(b, 1, f, h, w)
        vsf = self.pipe.vae_scale_factor_spatial
        padding = torch.zeros(1, 1, h * vsf, w * vsf, device=self.device, dtype=dtype)
        return self.model(hidden_states=noisy.to(self.device, dtype), timestep=timestep.to(dtype),
                          encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, dtype), fps=self.fps,
                          condition_mask=mask.to(dtype), padding_mask=padding, return_dict=False)[0].float()


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
    pipe_name = type(pipe).__name__
    if name.startswith("WanTransformer3D") and pipe_name == "WanPipeline" and transformer.config.in_channels == 16:
        return WanDenoiser(pipe, device)
    if name.startswith("CosmosTransformer3D") and pipe_name == "Cosmos2VideoToWorldPipeline":
        return CosmosDenoiser(pipe, device)
    raise UnsupportedAdapterError(
        f"training a {pipe_name} ({name or 'no denoiser'}) is not supported yet; lorakit train covers "
        "SD 1.x/2.x, SDXL, SD3, FLUX.1, Wan 2.1 text-to-video and Cosmos Predict2 Video2World pipelines"
    )
