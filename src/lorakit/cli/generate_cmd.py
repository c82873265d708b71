"""``lorakit generate``: load a pipeline (a local diffusers folder or ``tiny``), apply LoRAs, denoise with
a progress bar and write the PNG atomically. A LightX2V-style ``--config job.json`` supplies defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..io import parse_lora_spec  # re-exported: the CLI and the library share one parser

__all__ = ["generate_cmd", "parse_lora_spec"]


def _read_job(path: str) -> dict[str, Any]:
    try:
        job = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"cannot read job file {path}: {exc}", param_hint="--config") from exc
    if not isinstance(job, dict):
        raise click.BadParameter(f"{path} must hold a JSON object", param_hint="--config")
    return job


def _merge_job(job: dict[str, Any], opts: dict[str, Any], loras: tuple[str, ...]) -> dict[str, Any]:
    """Command-line options win over the job file, which wins over the defaults."""
    model = opts["model"] or job.get("model") or job.get("model_path")
    if not model:
        raise click.UsageError("pass --model DIR|tiny (or 'model' in the --config job file)")
    specs = [parse_lora_spec(s) for s in loras]
    if not specs:
        for entry in job.get("lora_configs", []):
            if not isinstance(entry, dict) or "path" not in entry:
                raise click.BadParameter(f"each lora_configs entry needs a 'path', got {entry!r}", param_hint="--config")
            specs.append((str(entry["path"]), float(entry.get("strength", 1.0))))
    pick = opts.get
    return {
        "model": model,
        "prompt": pick("prompt") if pick("prompt") is not None else job.get("prompt", ""),
        "negative_prompt": pick("negative_prompt") if pick("negative_prompt") is not None else job.get("negative_prompt"),
        "steps": pick("steps") or int(job.get("infer_steps", job.get("steps", 20))),
        "seed": pick("seed") if pick("seed") is not None else int(job.get("seed", 0)),
        "guidance": pick("guidance") if pick("guidance") is not None
        else float(job.get("guidance_scale", job.get("guidance", 7.5))),
        "width": pick("width") or job.get("width") or job.get("target_width"),
        "height": pick("height") or job.get("height") or job.get("target_height"),
        "specs": specs,
    }


@click.command("generate")
@click.option("--model", default=None, help="Local diffusers folder, or 'tiny' for the built-in test pipeline.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH]", help="LoRA file and strength (repeatable).")
@click.option("--prompt", default=None)
@click.option("--negative-prompt", default=None)
@click.option("--steps", type=int, default=None, help="Denoising steps [default: 20].")
@click.option("--seed", type=int, default=None, help="Random seed [default: 0].")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale [default: 7.5].")
@click.option("--mode", type=click.Choice(["fuse", "hook"]), default="fuse", show_default=True)
@click.option("--strict", is_flag=True, help="Fail if any LoRA layer does not match the model.")
@click.option("--skip-invalid", is_flag=True,
              help="Apply the valid layers of a LoRA with broken (NaN/Inf, incomplete) layers, with a warning; "
                   "by default such a file is refused.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--config", "config", default=None, type=click.Path(exists=True, dir_okay=False),
              help='LightX2V-style job JSON: {"lora_configs": [{"path": ..., "strength": ...}], "prompt": ..., ...}')
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def generate_cmd(
    model: str | None, loras: tuple[str, ...], prompt: str | None, negative_prompt: str | None, steps: int | None,
    seed: int | None, width: int | None, height: int | None, guidance: float | None, mode: str, strict: bool,
    skip_invalid: bool, output: str, config: str | None, as_json: bool,
) -> None:
    """Generate one image with LoRAs applied, e.g.
    ``lorakit generate --model tiny --lora style.safetensors:0.8 --prompt "a cat" --steps 4 -o cat.png``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..generation import generate
    from ..io import atomic_output, check_output
    from ..pipelines import load_pipeline

    opts = {"model": model, "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "seed": seed,
            "guidance": guidance, "width": width, "height": height}
    job = _merge_job(_read_job(config) if config else {}, opts, loras)
    # before loading anything: -o must not replace a --lora, the job file or a file of the model folder
    check_output(output, [config, job["model"], *(path for path, _ in job["specs"])])
    console = Console(stderr=True, quiet=as_json)
    # None: unmatched layers warn, broken layers refuse the file (lorakit.apply's default)
    strictness = True if strict else (False if skip_invalid else None)
    pipe = load_pipeline(job["model"])
    with Progress(TextColumn("denoising"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("denoise", total=job["steps"])
        result = generate(
            pipe, job["prompt"], negative_prompt=job["negative_prompt"], steps=job["steps"],
            guidance_scale=job["guidance"], seed=job["seed"], width=job["width"], height=job["height"],
            loras=job["specs"], mode=mode, strict=strictness, on_step=lambda _step: progress.advance(task),
        )
    if result.report is not None:
        console.print(result.report.summary())
    image = result.images[0]
    with atomic_output(output) as tmp:
        image.save(tmp, format="PNG")
    summary = {
        "output": os.fspath(output), "model": job["model"],
        "loras": [{"path": p, "strength": s} for p, s in job["specs"]],
        "steps": job["steps"], "seed": job["seed"], "size": list(image.size), "seconds": round(result.seconds, 3),
        "report": result.report_counts,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {output} ({image.size[0]}x{image.size[1]}, {job['steps']} steps, {result.seconds:.2f}s)")
