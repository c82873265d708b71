"""``lorakit extract | merge | compose | resize | validate``: thin click wrappers over :mod:`lorakit.ops`;
rich progress bars for people, ``--json`` for scripts (one JSON object on stdout).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..ops import OpResult

__all__ = ["compose_cmd", "extract_cmd", "merge_cmd", "resize_cmd", "validate_cmd"]


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A ``progress(description, done, total)`` callback drawing a rich bar on stderr (None with --json)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def _emit(result: OpResult, as_json: bool, headline: str) -> None:
    """``--json``: the result as one JSON object; otherwise the headline and a table of the summary."""
    if as_json:
        click.echo(json.dumps(result.to_dict(), default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(headline)
    table = Table(show_header=False, box=None)
    for key, value in result.summary.to_dict().items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
            value = value if len(value) < 200 else value[:197] + "..."
        table.add_row(key, str(value))
    console.print(table)


def _strength_specs(specs: tuple[str, ...]) -> list[tuple[str, float]]:
    from ..ops.merge import parse_lora_spec

    return [parse_lora_spec(s) for s in specs]


@click.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", required=True, help="output LoRA file (.safetensors)")
@click.option("--rank", type=int, default=32, show_default=True, help="rank (a cap with --energy/--max-error)")
@click.option("--conv-rank", type=int, default=None, help="rank of k×k convs (default: --rank; 0 skips them)")
@click.option("--energy", type=float, default=None, help="keep this fraction of Σσ² per layer")
@click.option("--max-error", type=float, default=None, help="smallest rank with relative error below this")
@click.option("--rank-budget", type=int, default=None, help="total rank shared by all layers")
@click.option("--size-budget", type=float, default=None, help="megabytes of factors shared by all layers")
@click.option("--diff-only", is_flag=True, help="write full 'diff' tensors instead of low-rank factors")
@click.option("--dtype", default=None, help="output dtype: fp32, fp16, bf16 (default fp32)")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]), default="kohya", show_default=True)
@click.option("--include", multiple=True, help="glob on tensor keys / module paths (repeatable)")
@click.option("--exclude", multiple=True, help="glob on tensor keys / module paths (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def extract_cmd(base, tuned, output, rank, conv_rank, energy, max_error, rank_budget, size_budget, diff_only, dtype,
                fmt, include, exclude, as_json) -> None:
    """Extract a LoRA from BASE and TUNED checkpoints (.safetensors, diffusers folder, .pt/.ckpt)."""
    if energy is not None and max_error is not None:
        raise click.UsageError("--energy and --max-error are mutually exclusive")
    if rank_budget is not None and size_budget is not None:
        raise click.UsageError("--rank-budget and --size-budget are mutually exclusive")
    from ..ops import extract

    with _progress(not as_json) as progress:
        result = extract(base, tuned, output, rank=rank, conv_rank=conv_rank, energy=energy, max_error=max_error,
                         rank_budget=rank_budget, size_budget_mb=size_budget, diff_only=diff_only, dtype=dtype,
                         format=fmt, include=include or None, exclude=exclude or None, progress=progress)
    _emit(result, as_json, f"Wrote {output}")


@click.command("merge")
@click.argument("base")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="output checkpoint (a folder when BASE is a folder)")
@click.option("--dtype", default=None, help="output dtype of floating tensors (default: as in BASE)")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True)
@click.option("--strict", is_flag=True, help="fail when any LoRA layer matches no module")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def merge_cmd(base, loras, output, dtype, fmt, strict, as_json) -> None:
    """Bake LORA[:STRENGTH]... into BASE, streaming one tensor at a time."""
    from ..ops import merge

    with _progress(not as_json) as progress:
        result = merge(base, _strength_specs(loras), output, dtype=dtype, format=fmt, strict=strict, progress=progress)
    _emit(result, as_json, f"Wrote {output}")


@click.command("compose")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="output LoRA file")
@click.option("--rank", type=int, default=None, help="refactorise every layer to at most this rank")
@click.option("--clamp-quantile", type=float, default=None, help="opt-in outlier clamp of the factors (e.g. 0.99)")
@click.option("--base", default=None, help="base checkpoint, needed only for DoRA inputs")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def compose_cmd(loras, output, rank, clamp_quantile, base, as_json) -> None:
    """Compose LORA:STRENGTH... into one LoRA equal to the weighted sum of their deltas."""
    from ..ops import compose

    with _progress(not as_json) as progress:
        result = compose(_strength_specs(loras), output, rank=rank, clamp_quantile=clamp_quantile, base=base,
                         progress=progress)
    _emit(result, as_json, f"Wrote {output}")


@click.command("resize")
@click.argument("source")
@click.option("-o", "--output", required=True, help="output LoRA file")
@click.option("--rank", type=int, default=None, help="new rank (a cap with --energy/--max-error)")
@click.option("--energy", type=float, default=None, help="keep this fraction of each layer's Σσ²")
@click.option("--max-error", type=float, default=None, help="smallest rank with relative error below this")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def resize_cmd(source, output, rank, energy, max_error, as_json) -> None:
    """Change the rank of a LoRA optimally (QR + SVD of the small core)."""
    if rank is None and energy is None and max_error is None:
        raise click.UsageError("pass one of --rank, --energy, --max-error")
    if energy is not None and max_error is not None:
        raise click.UsageError("--energy and --max-error are mutually exclusive")
    from ..ops import resize

    with _progress(not as_json) as progress:
        result = resize(source, output, rank=rank, energy=energy, max_error=max_error, progress=progress)
    _emit(result, as_json, f"Wrote {output}")


@click.command("validate")
@click.argument("lora")
@click.option("--base", required=True, help="base checkpoint")
@click.option("--tuned", required=True, help="fine-tuned checkpoint the LoRA should reproduce")
@click.option("--threshold", type=float, default=0.05, show_default=True, help="relative error counted as success")
@click.option("--report", default=None, help="write a self-contained HTML report here")
@click.option("--layer-names", default=None, help="write the LoRA's layer names here, one per line")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def validate_cmd(lora, base, tuned, threshold, report, layer_names, as_json) -> None:
    """Per-module error, coverage and success rate of LORA against TUNED − BASE."""
    from ..io import atomic_output, check_output
    from ..ops import validate

    if layer_names:  # checked before the work, like --report (inside validate)
        check_output(layer_names, [lora, base, tuned])
        if report and Path(report).expanduser().resolve() == Path(layer_names).expanduser().resolve():
            raise click.UsageError("--report and --layer-names name the same file; choose two paths")
    with _progress(not as_json) as progress:
        result = validate(lora, base, tuned, threshold=threshold, report=report, progress=progress)
    if layer_names:
        with atomic_output(layer_names) as tmp:
            tmp.write_text("\n".join(result.summary["layer_names"]) + "\n", encoding="utf-8")
    _emit(result, as_json, "Validation" + (f" (report: {report})" if report else ""))


@click.command("split")
@click.argument("checkpoint")
@click.option("--lora-out", required=True, help="the LoRA part (.safetensors, PEFT names with alpha in its header)")
@click.option("--base-out", default=None, help="the model's own weights (.base_layer dropped from names)")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: from --config, else alpha = rank)")
@click.option("--config", default=None, type=click.Path(dir_okay=False, exists=True),
              help="training config (JSON/YAML) to read lora_alpha / lora_rank from")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def split_cmd(checkpoint, lora_out, base_out, alpha, config, as_json) -> None:
    """Split a model checkpoint with LoRA layers inside (Cosmos Predict2 post-training) into LoRA and base."""
    from ..ops import split

    result = split(checkpoint, lora_out, base_out, alpha=alpha, config=config)
    _emit(result, as_json, f"Wrote {lora_out}" + (f" and {base_out}" if base_out else ""))
