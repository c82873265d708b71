"""``lorakit generate``: load a pipeline (a local diffusers folder or ``tiny[-<family>]``), apply LoRAs, denoise with
a progress bar and write the image or video atomically (the format follows the output suffix).

A LightX2V-style ``--config job.json`` supplies defaults; ``--batch-input jobs.jsonl`` runs one job per line in one
process, grouped by LoRA stack. Everything that can be checked without the model (output suffixes, required
inputs, devices, input images) is checked before the pipeline loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click

from ..generation.jobs import Job, LoraEntry, group_by_stack, parse_lora_arg, read_batch, read_config
from ..generation.tasks import TASKS
from ..io import parse_lora_spec  # re-exported: the CLI and the library share one parser

__all__ = ["generate_cmd", "parse_lora_spec"]

DEFAULTS = Job(prompt="", steps=20, seed=0)

# the diffusers class of each tiny family, so the task is known before anything loads
_TINY_CLASSES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                 "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux-kontext": "FluxKontextPipeline",
                 "wan-t2v": "WanPipeline", "wan-i2v": "WanImageToVideoPipeline",
                 "wan22": "WanPipeline",
                 "cosmos": "Cosmos2VideoToWorldPipeline", "ltx-video": "LTXPipeline", "ltx2": "LTX2Pipeline",
                 "hidream": "HiDreamImagePipeline", "lumina2": "Lumina2Pipeline", "z-image": "ZImagePipeline",
                 "qwen-image": "QwenImagePipeline", "qwen-image-edit": "QwenImageEditPipeline",
                 "hunyuanvideo": "HunyuanVideoPipeline", "flux2": "Flux2Pipeline", "krea2": "Krea2Pipeline"}


@dataclasses.dataclass
class _Planned:
    """A job ready to run: its settings, and its input image / video decoded."""

    job: Job
    image: Any = None
    video: Any = None


def _warn_unknown(path: str, keys: list[str]) -> None:
    if keys:
        click.echo(f"warning: {path}: ignoring keys lorakit does not use: {', '.join(keys)}", err=True)


def _base_job(opts: dict[str, Any], loras: tuple[str, ...]) -> Job:
    """Command-line options over the --config job file over the defaults."""
    config = Job()
    if opts["config"]:
        config, unknown = read_config(opts["config"])
        _warn_unknown(opts["config"], unknown)
    cli = Job(model=opts["model"], task=opts["task"], prompt=opts["prompt"], negative_prompt=opts["negative_prompt"],
              seed=opts["seed"], steps=opts["steps"], frames=opts["frames"], fps=opts["fps"], width=opts["width"],
              height=opts["height"], guidance=opts["guidance"], image=opts["image"], video=opts["video"],
              output=opts["output"], loras=tuple(parse_lora_arg(s) for s in loras) or None)
    job = cli.over(config.over(DEFAULTS))
    if not job.model:
        raise click.UsageError("pass --model DIR|tiny|tiny-<family> (or 'model_path' in the --config job file)")
    return job


def _jobs(base: Job, batch: str | None, output_given: bool) -> list[Job]:
    if not batch:
        if not base.output:
            raise click.UsageError("pass -o/--output FILE (or 'save_video_path' in the --config job file)")
        return [base]
    if output_given:
        raise click.UsageError("with --batch-input each line names its own 'output'; drop -o")
    lines, unknown = read_batch(batch)
    _warn_unknown(batch, unknown)
    jobs = [line.over(dataclasses.replace(base, output=None)) for line in lines]
    missing = [i + 1 for i, job in enumerate(jobs) if not job.output]
    if missing:
        raise click.UsageError(f"{batch}: job(s) {missing} have no 'output'; give each line an output path")
    if base.model and any(line.model not in (None, base.model) for line in lines):
        raise click.UsageError(f"{batch}: every job runs on --model {base.model}; drop 'model' from the lines")
    return jobs


def _pipeline_class(model: str) -> type | None:
    """The diffusers class ``model`` would load as, without loading it (``None``: not known beforehand)."""
    from ..pipelines import tiny_model_name

    family = tiny_model_name(model)
    name = _TINY_CLASSES.get(family) if family else None
    index = Path(model) / "model_index.json"
    if family is None and index.is_file():
        try:
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
    if not isinstance(name, str):
        return None
    import diffusers

    found = getattr(diffusers, name, None)
    return found if isinstance(found, type) else None


def _plan(jobs: list[Job], cls: Any, inputs: list[str | None]) -> list[_Planned]:
    """Check every job before any work: outputs (not an input, suffix fits the task), required inputs, and
    decode the input images / videos."""
    from .. import media
    from ..generation.tasks import check_inputs, infer_task, task_kind
    from ..io import check_output

    seen: dict[Path, int] = {}
    planned = []
    for number, job in enumerate(jobs, 1):
        where = f"job {number}: " if len(jobs) > 1 else ""
        loras = [e.path for e in job.stack]
        check_output(job.output, [*inputs, job.image, job.video, *loras])
        key = Path(job.output).expanduser().resolve()
        if key in seen:
            raise click.UsageError(f"{where}output {job.output} is also the output of job {seen[key]}")
        seen[key] = number
        task = job.task or (infer_task(cls) if cls is not None else None)
        if task is not None:
            media.check_output(task_kind(task), job.output)
            check_inputs(task, job.image, job.video)
        else:
            media.output_kind(job.output)
        image = media.read_image(job.image) if job.image else None
        video = media.read_video(job.video) if job.video else None
        planned.append(_Planned(job, image, video))
    return planned


def _encode(result: Any, output: str) -> tuple[bytes, dict[str, Any]]:
    from .. import media

    fmt = media.check_output(result.kind, output)
    if result.kind == "video":
        frames = result.frames[0]
        return media.encode_video(frames, fmt, result.fps), {"size": list(frames[0].size), "frames": len(frames),
                                                            "fps": result.fps}
    return media.encode_image(result.images[0], fmt), {"size": list(result.images[0].size)}


def _run_job(pipe: Any, item: _Planned, progress: Any, label: str) -> tuple[Any, dict[str, Any]]:
    from ..generation import call_default, generate
    from ..media import write_atomic

    job = item.job
    guidance = job.guidance if job.guidance is not None else (call_default(pipe, "guidance_scale") or 7.5)
    bar = progress.add_task(label, total=job.steps)
    result = generate(
        pipe, job.prompt, negative_prompt=job.negative_prompt, steps=job.steps, guidance_scale=guidance,
        guidance_scale_2=job.guidance_2, seed=job.seed, width=job.width, height=job.height, task=job.task,
        image=item.image, video=item.video, num_frames=job.frames, fps=job.fps,
        on_step=lambda _step: progress.advance(bar),
    )
    data, facts = _encode(result, job.output)
    write_atomic(job.output, data)
    return result, facts


def _summary(job: Job, result: Any, facts: dict[str, Any], report: Any) -> dict[str, Any]:
    return {"output": os.fspath(job.output), "model": job.model, "task": result.task, "kind": result.kind,
            "loras": [e.to_dict() for e in job.stack], "steps": job.steps, "seed": job.seed, **facts,
            "seconds": round(result.seconds, 3), "report": None if report is None else report.counts()}


def _line(summary: dict[str, Any]) -> str:
    w, h = summary["size"]
    video = f", {summary['frames']} frames at {summary['fps']:g} fps" if summary["kind"] == "video" else ""
    return f"wrote {summary['output']} ({w}x{h}{video}, {summary['steps']} steps, {summary['seconds']:.2f}s)"


def _run_all(pipe: Any, planned: list[_Planned], mode: str, strict: bool | None, console: Any,
             as_json: bool) -> None:
    """Run the jobs grouped by LoRA stack: each stack is applied once, its jobs run, then it is removed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..generation import apply_loras

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        for group in group_by_stack([p.job for p in planned]):
            stack: tuple[LoraEntry, ...] = planned[group[0]].job.stack
            patches = apply_loras(pipe, [e.spec() for e in stack], mode=mode, strict=strict) if stack else None
            report = None if patches is None else patches.report
            if report is not None:
                console.print(report.summary())
            try:
                for index in group:
                    label = f"job {index + 1}/{len(planned)}" if len(planned) > 1 else "denoising"
                    result, facts = _run_job(pipe, planned[index], progress, label)
                    summary = _summary(planned[index].job, result, facts, report)
                    click.echo(json.dumps(summary) if as_json else _line(summary))
            finally:
                if patches is not None:
                    patches.remove()


@click.command("generate")
@click.option("--model", default=None, help="Local diffusers folder, 'tiny' (SD1) or tiny-<family> "
              "(tiny-sdxl, tiny-sd3, tiny-flux, tiny-flux-kontext, tiny-wan-t2v, tiny-wan-i2v, tiny-cosmos).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH][@EXPERT]",
              help="LoRA file and strength (repeatable); @low_noise puts it on Wan 2.2's transformer_2, @high_noise "
                   "on the first transformer only.")
@click.option("--prompt", default=None)
@click.option("--negative-prompt", default=None)
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="Override the task taken from the pipeline class (t2i, i2i, t2v, i2v, v2w).")
@click.option("--image", default=None, type=click.Path(dir_okay=False),
              help="Input image: image-to-image, image-to-video, Video2World.")
@click.option("--video", default=None, type=click.Path(dir_okay=False), help="Input video for Video2World (Cosmos).")
@click.option("--frames", type=int, default=None, help="Frames of a video [default: the pipeline's].")
@click.option("--fps", type=float, default=None, help="Frame rate of the written video [default: 16; 24 for LTX].")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: 20].")
@click.option("--seed", type=int, default=None, help="Random seed [default: 0].")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale [default: the pipeline's].")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA, then MPS, then CPU), cpu, cuda[:N], mps.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on a CUDA GPU that supports it, else fp32.")
@click.option("--offload", type=click.Choice(["none", "model", "sequential"]), default="none", show_default=True,
              help="diffusers CPU offload, for models larger than the GPU (needs a GPU device).")
@click.option("--mode", type=click.Choice(["fuse", "hook", "branch"]), default="fuse", show_default=True,
              help="branch: append the LoRA factors to the low-rank branch of a model written by "
                   "'lorakit quantize --lowrank' (exact, no requantisation).")
@click.option("--strict", is_flag=True, help="Fail if any LoRA layer does not match the model.")
@click.option("--skip-invalid", is_flag=True,
              help="Apply the valid layers of a LoRA with broken (NaN/Inf, incomplete) layers, with a warning; "
                   "by default such a file is refused.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="File to write: .png/.jpg (image), .mp4 (H.264), .webp/.gif (animation).")
@click.option("--config", "config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="LightX2V-style job JSON (model_path, lora_configs, infer_steps, target_video_length, ...).")
@click.option("--batch-input", "batch", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON lines, one job per line (prompt, image, seed, loras, output), run in one process.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary per output instead of text.")
def generate_cmd(loras: tuple[str, ...], device: str, dtype: str, offload: str, mode: str, strict: bool,
                 skip_invalid: bool, batch: str | None, as_json: bool, **opts: Any) -> None:
    """Generate an image or a video with LoRAs applied, e.g.
    ``lorakit generate --model tiny-wan-t2v --lora style.safetensors:0.8 --prompt "a cat" --frames 5 -o cat.mp4``."""
    from rich.console import Console

    from ..generation import place_pipeline, resolve_device, resolve_dtype
    from ..pipelines import load_pipeline

    base = _base_job(opts, loras)
    jobs = _jobs(base, batch, opts["output"] is not None)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if offload != "none" and torch_device.type == "cpu":
        place_pipeline(None, torch_device, None, offload)  # raises the DeviceError before anything loads
    inputs = [opts["config"], batch, base.model]
    planned = _plan(jobs, _pipeline_class(base.model), inputs)
    console = Console(stderr=True, quiet=as_json)
    # None: unmatched layers warn, broken layers refuse the file (lorakit.apply's default)
    strictness = True if strict else (False if skip_invalid else None)
    pipe = load_pipeline(base.model, dtype=torch_dtype)
    pipe = place_pipeline(pipe, torch_device, None, offload)
    _run_all(pipe, planned, mode, strictness, console, as_json)
