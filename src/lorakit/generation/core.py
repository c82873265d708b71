"""Generation with LoRAs, shared by ``lorakit generate`` and the server's worker: apply the LoRAs (to the first
transformer, or to one expert of Wan 2.2 A14B), seed one CPU generator per prompt, call the diffusers pipeline for
its task (image or video, text- or image-conditioned), and remove the LoRAs again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import TaskInputError
from ..model import LoRA
from ..runtime import ApplyReport, apply
from .tasks import call_default, call_params, check_inputs, infer_task, pipeline_for_task, task_kind

__all__ = ["EXPERTS", "GenerateResult", "LoraPatches", "LoraSpec", "apply_loras", "default_fps", "generate"]

# A LoRA (parsed, or a file to load), its strength and optionally the Wan 2.2 expert it belongs to.
LoraSpec = (tuple[LoRA | str | os.PathLike[str], float]
            | tuple[LoRA | str | os.PathLike[str], float, str | None])

#: Wan 2.2 A14B experts -> the pipeline attribute that holds them. diffusers runs ``transformer`` while the timestep
#: is at or above ``boundary_ratio * 1000`` (high noise, the first steps) and ``transformer_2`` below it.
EXPERTS: dict[str, str] = {"high_noise": "transformer", "low_noise": "transformer_2"}


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """``images``: PIL images (``output_type="pil"``) or HxWx3 float arrays in [0, 1] (``"np"``), one per
    prompt (for a video, its first frame); ``report``: what applying the LoRAs matched (``None`` without LoRAs);
    ``seconds``: the pipeline call alone, LoRA apply and remove excluded. ``kind``: ``"image"`` or ``"video"``;
    ``frames``: for a video, one list of PIL frames per prompt (PIL whatever ``output_type``), else ``None``;
    ``fps``: the video's frame rate (``None`` for an image); ``task``: the task that ran (t2i, i2v...)."""

    images: list[Any]
    report: ApplyReport | None
    seconds: float
    kind: str = "image"
    frames: list[list[Any]] | None = None
    fps: float | None = None
    task: str = "t2i"

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


def _merge_reports(reports: list[tuple[str, ApplyReport]]) -> ApplyReport | None:
    """One report for several applies; labels of an expert's apply get its name first (``low_noise/0:file``)."""
    if not reports:
        return None
    if len(reports) == 1 and not reports[0][0]:
        return reports[0][1]
    merged = ApplyReport(mode=reports[0][1].mode)
    for prefix, report in reports:
        tag = f"{prefix}/" if prefix else ""
        for field in ("matched", "unmatched", "shape_mismatches", "invalid"):
            getattr(merged, field).update({f"{tag}{k}": v for k, v in getattr(report, field).items()})
        merged.quant.update(report.quant)
        merged.untouched_modules += report.untouched_modules
        merged.touched_tensors += report.touched_tensors
        merged.families.extend(f for f in report.families if f not in merged.families)
        merged.notes.extend(report.notes)
    return merged


class LoraPatches:
    """The patches of one :func:`apply_loras` call; ``remove()`` undoes them, last applied first."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, Any]] = []

    def remove(self) -> None:
        while self.patches:
            _, patch = self.patches.pop()
            patch.remove()

    @property
    def report(self) -> ApplyReport | None:
        return _merge_reports([(prefix, p.report) for prefix, p in self.patches])


def _normalise_specs(loras: Sequence[Any]) -> dict[str | None, list[tuple[Any, float]]]:
    groups: dict[str | None, list[tuple[Any, float]]] = {None: [], "high_noise": [], "low_noise": []}
    for spec in loras:
        lora, strength, *rest = spec
        expert = rest[0] if rest else None
        if expert not in groups:
            raise TaskInputError(f"unknown expert {expert!r} for LoRA {lora}; use high_noise or low_noise",
                                 flag="--lora", field="loras")
        groups[expert].append((lora, float(strength)))
    return groups


def apply_loras(pipe: Any, loras: Sequence[Any], *, mode: str = "fuse", strict: bool | None = None) -> LoraPatches:
    """Apply ``[(LoRA or path, strength[, expert]), ...]`` to ``pipe``. Without an expert a LoRA goes to the whole
    pipeline (its first transformer or UNet, and text encoders it names), as :func:`lorakit.apply` does;
    ``"high_noise"`` targets ``pipe.transformer`` only, ``"low_noise"`` ``pipe.transformer_2`` (Wan 2.2 A14B).
    On error the pipeline is left unchanged."""
    groups = _normalise_specs(loras)
    patches = LoraPatches()
    try:
        if groups[None]:
            patches.patches.append(("", apply(pipe, groups[None], mode=mode, strict=strict)))
        for expert in ("high_noise", "low_noise"):
            if groups[expert]:
                module = getattr(pipe, EXPERTS[expert], None)
                if not isinstance(module, torch.nn.Module):
                    raise TaskInputError(
                        f"LoRA {groups[expert][0][0]} is for the {expert} expert ({EXPERTS[expert]}), but "
                        f"{type(pipe).__name__} has no {EXPERTS[expert]}; drop @{expert} (Wan 2.2 A14B has two experts)",
                        flag="--lora", field="loras",
                    )
                patches.patches.append(
                    (expert, apply(module, groups[expert], mode=mode, strict=strict, component="denoiser")))
    except BaseException:
        patches.remove()
        raise
    return patches


def default_fps(pipe: Any) -> float:
    """The frame rate a pipeline's videos are made for: 16 for Wan and Cosmos Predict2, 24 for LTX-Video and
    HunyuanVideo, else 16."""
    name = type(pipe).__name__
    return 24.0 if name.startswith(("LTX", "Hunyuan")) else 16.0


def _to_pil(array: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8))


def _call_kwargs(runner: Any, task: str, *, steps: int, guidance_scale: float, guidance_scale_2: float | None,
                 seed: Any, negative_prompt: Any, width: int | None, height: int | None, image: Any, video: Any,
                 num_frames: int | None, fps: float | None, on_step: Any, output_type: str) -> dict[str, Any]:
    kind = task_kind(task)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
                              "generator": _generators(seed), "output_type": "np" if kind == "video" else output_type}
    params = call_params(runner)
    if image is not None and "width" not in params and (width or height):
        # image-to-image twins (StableDiffusionImg2ImgPipeline...) size the output from the input image
        image = image.resize((int(width or image.width), int(height or image.height)))
        width = height = None
    optional = {"negative_prompt": negative_prompt or None, "width": int(width) if width else None,
                "height": int(height) if height else None, "image": image, "video": video,
                "num_frames": int(num_frames) if num_frames and kind == "video" else None,
                "guidance_scale_2": guidance_scale_2,
                "fps": int(round(fps)) if fps and "fps" in params else None,  # Cosmos conditions on the frame rate
                "callback_on_step_end": _step_callback(on_step) if on_step is not None else None}
    strength = call_default(runner, "strength")
    if isinstance(strength, float) and int(steps * strength) < 1:
        raise TaskInputError(f"{type(runner).__name__} denoises only strength={strength} of the {steps} steps, which "
                             f"is none: pass --steps {int(np.ceil(1 / strength))} or more", flag="--steps", field="steps")
    for key, value in optional.items():
        if value is None:
            continue
        if key not in params and key != "fps":
            raise TaskInputError(f"{type(runner).__name__} does not take {key}=; drop it", field=key)
        kwargs[key] = value
    return kwargs


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
    task: str | None = None,
    image: Any = None,
    video: Sequence[Any] | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    guidance_scale_2: float | None = None,
) -> GenerateResult:
    """Generate one image or video per prompt with ``pipe`` (a diffusers pipeline).

    ``task`` (t2i, i2i, t2v, i2v, v2w; see :mod:`lorakit.generation.tasks`) defaults to the pipeline's own; a
    missing required input (``image`` for i2v) raises :class:`~lorakit.errors.MissingInputError` before any work.
    ``image`` is a PIL image, ``video`` a list of PIL frames (v2w only); ``num_frames`` and ``fps`` are for video
    tasks (``fps`` defaults to :func:`default_fps`; Cosmos also conditions on it). ``guidance_scale_2`` is the
    low-noise expert's guidance (Wan 2.2 A14B).

    ``seed`` is one seed for the whole call, or one per prompt (a list of prompts, one generator each).
    ``loras`` (``[(LoRA or path, strength[, expert]), ...]``, see :func:`apply_loras`) are applied with
    ``mode``/``strict`` (as in :func:`lorakit.apply`: by default a file with broken layers is refused) for this call
    only and removed afterwards, also on error. ``width``/``height`` and an empty ``negative_prompt`` are
    left to the pipeline's defaults. ``on_step(step)`` is called after every denoising step, for every task.
    """
    if not isinstance(seed, int) and isinstance(prompt, list) and len(seed) != len(prompt):
        raise ValueError(f"got {len(seed)} seeds for {len(prompt)} prompts; pass one seed per prompt")
    task = task or infer_task(pipe)
    check_inputs(task, image, video)
    runner = pipeline_for_task(pipe, task)
    kind = task_kind(task)
    kwargs = _call_kwargs(runner, task, steps=steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2,
                          seed=seed, negative_prompt=negative_prompt, width=width, height=height, image=image,
                          video=None if video is None else list(video), num_frames=num_frames, fps=fps,
                          on_step=on_step, output_type=output_type)
    patches = apply_loras(pipe, list(loras), mode=mode, strict=strict) if loras else None
    report = None if patches is None else patches.report
    try:
        started = time.perf_counter()
        out = runner(prompt=prompt, **kwargs)  # keyword: FluxKontext takes image first
        seconds = time.perf_counter() - started
    finally:
        if patches is not None:
            patches.remove()
    if kind == "image":
        return GenerateResult(images=list(out.images), report=report, seconds=seconds, task=task)
    videos = np.asarray(out.frames)  # (prompts, frames, H, W, 3) floats in [0, 1]
    frames = [[_to_pil(f) for f in clip] for clip in videos]
    firsts = [clip[0] for clip in frames] if output_type == "pil" else [clip[0] for clip in videos]
    return GenerateResult(images=firsts, report=report, seconds=seconds, kind="video", frames=frames,
                          fps=float(fps) if fps else default_fps(pipe), task=task)
