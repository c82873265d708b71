"""``lorakit train``: train a new LoRA, or continue an existing file on chosen layers. A thin layer over
:func:`lorakit.train`: parameter statistics and notes go to stderr, ``--json`` prints one object on stdout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

__all__ = ["train_cmd"]


def _patterns(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--x a,b --x c`` -> ``("a", "b", "c")``."""
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


#: validation and caching, the video families, the text encoder, buckets and loss weighting
_MORE = [
    click.option("--validate-every", type=int, default=None, help="Validation loss every N steps."),
    click.option("--validation-split", type=float, default=0.0, show_default=True, help="Fraction of samples held out."),
    click.option("--cache-latents", is_flag=True, help="Encode each image and caption once."),
    click.option("--frames", type=int, default=None, help="Video families (Wan, Cosmos): frames taken from each clip, 4k+1 [default: 5]."),
    click.option("--expert", type=click.Choice(["high", "low"]), default=None,
                 help="Wan 2.2 A14B (two experts, required there): train the high-noise transformer (timesteps >= "
                      "boundary_ratio*1000) or the low-noise transformer_2 (below); one LoRA file per expert."),
    click.option("--train-text-encoder", is_flag=True, help="Also train a LoRA on the CLIP text encoder(s)."),
    click.option("--text-encoder-lr", type=float, default=None, help="Learning rate of the text-encoder LoRA [default: --lr]."),
    click.option("--buckets", is_flag=True, help="Aspect-ratio buckets around --resolution² (batches hold one bucket)."),
    click.option("--bucket-step", type=int, default=64, show_default=True, help="Bucket side grid in pixels."),
    click.option("--min-snr-gamma", type=float, default=None, help="Min-SNR-γ loss weighting (e.g. 5)."),
    click.option("--noise-offset", type=float, default=0.0, show_default=True, help="Noise offset (e.g. 0.05)."),
]


def _more_options(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_MORE):
        f = option(f)
    return f


@click.command("train")
@click.option("--model", required=True, help="Local diffusers folder, 'tiny' or 'tiny-<family>'.")
@click.option("--data", required=True,
              help="Folder of images (video families: .mp4 clips) with .txt captions, a metadata.jsonl, or .tar shards.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The LoRA file to write.")
@click.option("--init", default=None, type=click.Path(exists=True, dir_okay=False), help="Continue this LoRA file.")
@click.option("--train-modules", multiple=True, metavar="PATTERN,...",
              help="Layers that train (substrings such as attn2/up_blocks, or globs); the rest stay frozen.")
@click.option("--freeze-modules", multiple=True, metavar="PATTERN,...", help="Layers kept frozen (wins over --train-modules).")
@click.option("--rank", type=int, default=None, help="New LoRA rank [default: 16; with --init: the file's].")
@click.option("--alpha", type=float, default=None, help="New LoRA alpha [default: rank].")
@click.option("--targets", multiple=True, metavar="PATTERN,...", help="Denoiser modules a new LoRA covers.")
@click.option("--preset", type=click.Choice(["attn", "attn-mlp", "all-linear"]), default=None,
              help="Named target set [default: attn].")
@click.option("--conv-rank", type=int, default=None, help="Also train k×k convolutions (LoCon) at this rank.")
@click.option("--conv-alpha", type=float, default=None)
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: 1000].")
@click.option("--epochs", type=int, default=None, help="Passes over the data (instead of --steps).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-scheduler", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw", show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--resolution", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=None, help="Write the LoRA (and --state-dir) every N steps.")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False), help="Optimizer/scheduler/RNG/step state.")
@click.option("--resume", default=None, type=click.Path(exists=True), help="Continue a run from its --state-dir.")
@_more_options
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft", "same"]), default=None,
              help="Output naming [default: same with --init, kohya for UNets, peft for transformers].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [default: cuda when available].")
@click.option("--strict", is_flag=True, help="A --init file that does not fit the model is an error.")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="HTML report path [default: OUTPUT-stem.train_report.html beside the output].")
@click.option("--no-report", is_flag=True, help="Write no HTML report.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def train_cmd(**opts: object) -> None:
    """Train a LoRA on a diffusers pipeline, or continue an existing LoRA file on chosen layers.

    \b
        lorakit train --model ./sd15 --data ./shapes -o shapes.safetensors --rank 8 --steps 500
        lorakit train --model ./sd15 --data ./more --init style.safetensors --train-modules attn2 -o style2.safetensors
        lorakit inspect style.safetensors --layer-names     # the names --train-modules chooses from
    """
    from .. import TrainConfig, train

    as_json, output = bool(opts.pop("as_json")), Path(str(opts.pop("output")))
    no_report, report = bool(opts.pop("no_report")), opts.pop("report")
    model, data = str(opts.pop("model")), str(opts.pop("data"))
    for key in ("train_modules", "freeze_modules", "targets"):
        opts[key] = _patterns(opts[key])  # type: ignore[arg-type]
    opts["format"] = opts.pop("fmt")
    if not no_report and report is None:
        report = output.with_name(output.stem + ".train_report.html")
    main_process = os.environ.get("RANK", "0") == "0"  # under a launcher, only rank 0 talks
    config = TrainConfig(output=output, report=None if no_report else report,
                         progress=main_process and not as_json, **opts)

    def log(line: str) -> None:
        if main_process:
            click.echo(line, err=True)

    result = train(model, data, config, log=log)
    if not main_process:
        return
    if as_json:
        click.echo(json.dumps(result.to_dict(), sort_keys=True))
        return
    first, last = result.loss[0], result.loss[-1]
    line = f"wrote {result.output} ({result.steps} steps, loss {first:.4f} -> {last:.4f}"
    if result.validation_loss:
        line += f", validation {result.validation_loss[0][1]:.4f} -> {result.validation_loss[-1][1]:.4f}"
    click.echo(line + f", {result.seconds:.1f} s)")
    if result.report is not None:
        click.echo(f"report: {result.report}")
