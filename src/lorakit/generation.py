"""Image generation with LoRAs, shared by ``lorakit generate`` and the server's worker: apply the LoRAs,
seed one CPU generator per image, call the diffusers pipeline, and remove the LoRAs again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .model import LoRA
from .runtime import ApplyReport, apply

__all__ = ["GenerateResult", "generate"]

# A LoRA (parsed, or a file to load) and its strength.
LoraSpec = tuple[LoRA | str | os.PathLike[str], float]


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """``images``: PIL images (``output_type="pil"``) or HxWx3 float arrays in [0, 1] (``"np"``), one per
    prompt; ``report``: what applying the LoRAs matched (``None`` without LoRAs); ``seconds``: the
    pipeline call alone, LoRA apply and remove excluded."""

    images: list[Any]
    report: ApplyReport | None
    seconds: float

    @property
    def report_counts(self) -> dict[str, dict[str, int]] | None:
        """Per LoRA: matched / unmatched / shape-mismatched layer counts (``None`` without LoRAs)."""
        return None if self.report is None else self.report.counts()


def _generators(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    # CPU generators whatever the pipeline's device: the same seed gives the same image on any machine.
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def _step_callback(on_step: Callable[[int], None]) -> Callable[..., dict[str, Any]]:
    def callback(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step)
        return kwargs

    return callback


def generate(
    pipe: Any,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    steps: int,
    guidance_scale: float,
    seed: int | Sequence[int],
    width: int | None = None,
    height: int | None = None,
    loras: Sequence[LoraSpec] | None = None,
    mode: str = "fuse",
    strict: bool | None = None,
    on_step: Callable[[int], None] | None = None,
    output_type: str = "pil",
) -> GenerateResult:
    """Generate one image per prompt with ``pipe`` (a diffusers pipeline).

    ``seed`` is one seed for the whole call, or one per prompt (a list of prompts, one generator each).
    ``loras`` (``[(LoRA or path, strength), ...]``) are applied with ``mode``/``strict`` (as in
    :func:`lorakit.apply`: by default a file with broken layers is refused) for this call
    only and removed afterwards, also on error. ``width``/``height`` and an empty ``negative_prompt`` are
    left to the pipeline's defaults. ``on_step(step)`` is called after every denoising step.
    """
    if not isinstance(seed, int) and isinstance(prompt, list) and len(seed) != len(prompt):
        raise ValueError(f"got {len(seed)} seeds for {len(prompt)} prompts; pass one seed per prompt")
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
                              "generator": _generators(seed), "output_type": output_type}
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if width:
        kwargs["width"] = int(width)
    if height:
        kwargs["height"] = int(height)
    if on_step is not None:
        kwargs["callback_on_step_end"] = _step_callback(on_step)
    patch = apply(pipe, list(loras), mode=mode, strict=strict) if loras else None
    try:
        started = time.perf_counter()
        images = list(pipe(prompt, **kwargs).images)
        seconds = time.perf_counter() - started
    finally:
        if patch is not None:
            patch.remove()
    return GenerateResult(images=images, report=None if patch is None else patch.report, seconds=seconds)
