"""The training objective of each denoiser family, read from the pipeline: ε- or v-prediction on a DDPM
schedule (SD 1/2, SDXL: ``x_t = add_noise(x0, ε, t)``) or flow matching (SD3, FLUX.1, Wan 2.1/2.2, Cosmos Predict2:
``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``). A :class:`Denoiser` turns images and captions into latents and conditioning, and runs the
model on noisy latents."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InternalError, UnsupportedAdapterError

__all__ = ["VIDEO_FAMILIES", "Denoiser", "denoiser_for"]


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
    """Wan 2.1 / 2.2 A14B text-to-video: flow matching with the scheduler's ``shift`` (``flow_shift`` on UniPC
    configs), the transformer takes ``timestep = σ·1000``.

    Wan 2.2 A14B has two experts: diffusers runs ``transformer`` while the timestep is at or above
    ``boundary_ratio·1000`` (high noise) and ``transformer_2`` below it (low noise). ``expert`` trains one of them
    (as musubi-tuner and LightX2V's separate high/low LoRA files do): the LoRA sits on that transformer and σ is
    drawn from the shifted distribution *restricted to that expert's range* (inverse CDF, one uniform per sample),
    so the expert sees the timesteps it meets at inference, with the frequencies it meets them."""

    def __init__(self, pipe: Any, device: torch.device, expert: str | None = None) -> None:
        super().__init__(pipe, device)
        sched = pipe.scheduler.config
        self.sigma_shift = float(sched.get("flow_shift") or sched.get("shift") or 1.0)
        self.expert = expert
        self.boundary: float | None = None
        if expert is not None:
            self.boundary = float(pipe.config.boundary_ratio)
            self.model = pipe.transformer if expert == "high" else pipe.transformer_2

    def draw_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.boundary is None:
            return super().draw_time(n, generator)
        s, b = self.sigma_shift, self.boundary
        u_b = b / (s - (s - 1) * b)  # the unshifted draw whose shifted σ is the boundary
        lo, hi = (u_b, 1.0) if self.expert == "high" else (0.0, u_b)
        u = lo + (hi - lo) * torch.rand(n, generator=generator)
        sigma = s * u / (1 + (s - 1) * u)
        return self._routed(sigma)

    def _routed(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma`` nudged (by float steps, at the boundary only) until the pipeline's own float32 test
        ``σ·T >= boundary_ratio·T`` sends every sample to this expert."""
        threshold = torch.tensor(self.boundary * self.timesteps, dtype=torch.float32)
        high = self.expert == "high"
        toward = torch.tensor(2.0 if high else -1.0)
        for _ in range(64):
            t = sigma.float() * self.timesteps
            wrong = t < threshold if high else t >= threshold
            if not wrong.any():
                return sigma
            sigma = torch.where(wrong, torch.nextafter(sigma.float(), toward), sigma)
        raise InternalError(f"could not draw a timestep on the {self.expert} side of boundary {self.boundary}")

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        timestep = (t.float() * self.timesteps).to(self.device)
        return self.model(hidden_states=noisy.to(self.device, dtype), timestep=timestep,
                          encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, dtype),
                          return_dict=False)[0].float()


class WanI2VDenoiser(WanDenoiser):
    """Wan image-to-video (2.1 I2V; 2.2 A14B I2V with ``expert``): the clip is the training input and its first
    frame the condition, built as ``WanImageToVideoPipeline`` builds it at inference (``prepare_latents``,
    ``encode_image``, ``__call__``):

    - ``latent_condition``: the VAE mode of ``[first frame, F-1 zero frames]``, normalised ``(z - mean)·(1/std)``;
    - the mask: 4 channels (the VAE's temporal factor) per latent frame, 1 on the first latent frame, 0 after;
    - transformer input ``cat([noisy latents, mask, latent_condition], channels)``;
    - ``encoder_hidden_states_image``: the CLIP image encoder's second-to-last hidden states of the first frame
      (Wan 2.1 only: a transformer with ``image_dim``).

    The loss is over the noisy video channels, as for text-to-video. The condition travels through the run's
    batches and latent cache as extra channels of the encoded "latents" with posterior std 0 (so ``x0`` keeps them
    exactly and the noise never touches them), and the CLIP features as further channels packed behind them: one
    encode per clip gives everything the step needs."""

    def __init__(self, pipe: Any, device: torch.device, expert: str | None = None) -> None:
        super().__init__(pipe, device, expert)
        self.z = int(self.vae.config.z_dim)
        self.temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
        self.width = int(self.model.config.in_channels)  # noisy + mask + condition channels
        if self.width != 2 * self.z + self.temporal:
            raise UnsupportedAdapterError(
                f"{type(self.model).__name__} takes {self.width} input channels, not the {2 * self.z + self.temporal} "
                "(noise + mask + image latents) of Wan image-to-video; training this pipeline is not supported"
            )
        self.image_features = getattr(self.model.config, "image_dim", None) is not None
        self._image_tokens: tuple[int, int] | None = None  # (tokens, width) of the CLIP features, set by encode

    @torch.no_grad()
    def condition(self, first: torch.Tensor, frames: int) -> torch.Tensor:
        """``[B, 4 + z, f, h, w]``: the mask and ``latent_condition`` of a ``frames``-frame clip whose first frame is
        ``first`` (``[B, 3, H, W]`` in [-1, 1])."""
        b, _, height, width = first.shape
        video = torch.cat([first[:, :, None], first.new_zeros(b, 3, frames - 1, height, width)], dim=2)
        latent = self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist.mode().float()
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(self.device, torch.float32)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(self.device, torch.float32)
        latent = (latent - mean) * inv_std
        mask = torch.zeros(b, self.temporal, *latent.shape[2:], device=latent.device)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def image_embeddings(self, first: torch.Tensor) -> torch.Tensor:
        """``[B, tokens, width]``: what ``encode_image`` gives for the first frames (PIL images, as a user passes)."""
        from PIL import Image

        u8 = ((first.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return self.pipe.encode_image([Image.fromarray(x) for x in u8], self.device).float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels [B, 3, F, H, W]`` -> ``(mean, std)``: the clip's posterior, then the condition channels and the
        packed CLIP features with std 0."""
        mean, std = super().encode_images(pixels)
        first = pixels[:, :, 0]
        extra = [self.condition(first, pixels.shape[2])]
        if self.image_features:
            features = self.image_embeddings(first)
            self._image_tokens = (features.shape[1], features.shape[2])
            extra.append(_pack(features, mean.shape[2:]))
        extra_t = torch.cat(extra, dim=1)
        return torch.cat([mean, extra_t], dim=1), torch.cat([std, torch.zeros_like(extra_t)], dim=1)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, target = super().noisy_and_target(x0[:, : self.z], noise[:, : self.z], t)
        return torch.cat([noisy, x0[:, self.z :]], dim=1), target

    def model_inputs(self, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden_states, encoder_hidden_states_image)`` the transformer gets for ``noisy`` (from
        :meth:`noisy_and_target`)."""
        hidden = noisy[:, : self.width]
        if not self.image_features:
            return hidden, None
        if self._image_tokens is None:
            raise InternalError("the Wan I2V conditioning was not encoded before the model ran; please report it")
        return hidden, _unpack(noisy[:, self.width :], self._image_tokens)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._dtype()
        hidden, image = self.model_inputs(noisy.to(self.device))
        timestep = (t.float() * self.timesteps).to(self.device)
        return self.model(hidden_states=hidden.to(dtype), timestep=timestep,
                          encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, dtype),
                          encoder_hidden_states_image=None if image is None else image.to(dtype),
                          return_dict=False)[0].float()


def _pack(features: torch.Tensor, grid: torch.Size) -> torch.Tensor:
    """``[B, S, D]`` -> ``[B, k, *grid]``: the values in order, zero-padded to whole channels."""
    b = features.shape[0]
    per = math.prod(grid)
    flat = features.reshape(b, -1)
    k = -(-flat.shape[1] // per)
    return torch.nn.functional.pad(flat, (0, k * per - flat.shape[1])).reshape(b, k, *grid)


def _unpack(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_pack`: ``[B, k, *grid]`` -> ``[B, S, D]``."""
    return packed.reshape(packed.shape[0], -1)[:, : shape[0] * shape[1]].reshape(-1, *shape)


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


#: the video families ``lorakit train`` covers, for the messages that refuse the others
VIDEO_FAMILIES = ("Wan 2.1 text-to-video and image-to-video, Wan 2.2 A14B (with --expert high|low) and Cosmos "
                  "Predict2 Video2World")


def _expert(pipe: Any, expert: str | None) -> str | None:
    """``expert`` checked against the pipeline: required with two experts, refused with one."""
    two = getattr(pipe, "transformer_2", None) is not None
    if two and expert is None:
        from ..errors import TaskInputError

        ratio = getattr(pipe.config, "boundary_ratio", None)
        raise TaskInputError(
            f"this {type(pipe).__name__} has two experts (Wan 2.2 A14B, boundary_ratio {ratio}): train one at a time "
            "with --expert high (transformer, high-noise timesteps) or --expert low (transformer_2), expert= in "
            "the library; each writes its own LoRA file", flag="--expert", field="expert")
    if expert is not None and not two:
        from ..errors import TaskInputError

        raise TaskInputError(
            f"--expert {expert}: this {type(pipe).__name__} has one transformer (no transformer_2); --expert is for "
            "Wan 2.2 A14B's two experts, drop it", flag="--expert", field="expert")
    if two and getattr(pipe.config, "boundary_ratio", None) is None:
        raise UnsupportedAdapterError(
            f"this {type(pipe).__name__} has a transformer_2 but no boundary_ratio in its config, so the experts' "
            "timestep ranges are unknown; set boundary_ratio in model_index.json (Wan 2.2 A14B T2V: 0.875, I2V: 0.9)")
    return expert


def denoiser_for(pipe: Any, device: torch.device, expert: str | None = None) -> Denoiser:
    """The :class:`Denoiser` of ``pipe`` (by its denoiser class), or :class:`UnsupportedAdapterError`. ``expert``
    (``"high"``/``"low"``) picks the Wan 2.2 A14B expert to train: required for a two-expert pipeline."""
    transformer = getattr(pipe, "transformer", None)
    unet = getattr(pipe, "unet", None)
    pipe_name = type(pipe).__name__
    wan = pipe_name in ("WanPipeline", "WanImageToVideoPipeline")
    if not wan and expert is not None:
        _expert(pipe, expert)
    if unet is not None:
        return (SDXLDenoiser if getattr(pipe, "text_encoder_2", None) is not None else UNetDenoiser)(pipe, device)
    name = type(transformer).__name__
    if name.startswith("FluxTransformer2D"):
        return FluxDenoiser(pipe, device)
    if name.startswith("SD3Transformer2D"):
        return SD3Denoiser(pipe, device)
    if name.startswith("WanTransformer3D") and wan:
        if getattr(pipe.config, "expand_timesteps", False):
            raise UnsupportedAdapterError(
                f"training Wan 2.2 TI2V-5B (a {pipe_name} with expand_timesteps) is not supported yet; lorakit train "
                f"covers {VIDEO_FAMILIES}")
        expert = _expert(pipe, expert)
        if pipe_name == "WanImageToVideoPipeline":
            return WanI2VDenoiser(pipe, device, expert)
        if transformer.config.in_channels == 16:
            return WanDenoiser(pipe, device, expert)
    if name.startswith("CosmosTransformer3D") and pipe_name == "Cosmos2VideoToWorldPipeline":
        return CosmosDenoiser(pipe, device)
    raise UnsupportedAdapterError(
        f"training a {pipe_name} ({name or 'no denoiser'}) is not supported yet; lorakit train covers "
        f"SD 1.x/2.x, SDXL, SD3 and FLUX.1 images, and video: {VIDEO_FAMILIES}"
    )
