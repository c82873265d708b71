"""``lorakit inspect`` and ``lorakit convert``: look inside a LoRA file, rewrite it in another convention."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..inspection import InspectResult

__all__ = ["convert_cmd", "inspect_cmd"]


@click.command("inspect")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--model", default=None, help="A diffusers folder, 'tiny' or a family name: adds coverage.")
@click.option("--layer-names", is_flag=True, help="List the layer names, one a line (what lorakit train --train-modules picks).")
def inspect_cmd(file: str, as_json: bool, model: str | None, layer_names: bool = False) -> None:
    """Show a LoRA file's format, adapter types, ranks, alphas and every key that did not load.

    \b
        lorakit inspect style.safetensors
        lorakit inspect style.safetensors --json | jq .ranks
        lorakit inspect style.safetensors --layer-names
    """
    if layer_names:
        from .. import load

        names = list(load(file).layers)
        click.echo(json.dumps(names) if as_json else "\n".join(names))
        return
    from .. import inspect

    target = _model(model) if model else None
    info = inspect(file, model=target)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2, sort_keys=True, default=str))
        return
    _print_table(file, info)


def _print_table(file: str, info: InspectResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{file}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rank_txt = "-" if not info.ranks else (
        str(info.rank_min) if info.rank_min == info.rank_max else f"{info.rank_min}..{info.rank_max}"
    )
    rows = [
        ("format", info.format),
        ("family", str(info.family or "-")),
        *([("candidates", "; ".join(_candidate(c) for c in info.candidates))] if info.candidates else []),
        ("layers", str(info.layers)),
        ("adapter types", ", ".join(f"{k}={v}" for k, v in info.adapter_types.items())),
        ("rank", rank_txt),
        ("alpha", ", ".join(f"{k} ({v} layers)" for k, v in info.alphas.items()) or "-"),
        ("dtypes", ", ".join(f"{k} ({v})" for k, v in info.dtypes.items())),
        ("parameters", f"{info.parameters:,}"),
        ("file size", "-" if info.file_size is None else f"{info.file_size / 1e6:.2f} MB"),
        ("components", ", ".join(f"{k} ({v})" for k, v in info.components.items())),
        ("targets", ", ".join(f"{k} ({v})" for k, v in info.target_kinds.items())),
    ]
    base = info.report.get("base_parameters", 0)
    if base:
        # a model checkpoint with LoRA layers inside (Cosmos post-training): Cosmos' own statistics
        total = base + info.parameters
        rows += [("base weights", f"{info.report['base_weights']:,} keys (split them off with `lorakit split`)"),
                 ("total parameters", f"{total:,}"), ("LoRA parameters", f"{info.parameters:,}"),
                 ("LoRA parameter ratio", f"{100 * info.parameters / total:.2f}%")]
    if info.coverage is not None:
        rows.append(("coverage", f"{info.coverage.matched} matched, {len(info.coverage.unmatched)} unmatched"
                     + (f", {len(info.coverage.misfits)} wrong shape" if info.coverage.misfits else "")))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    misfits = info.coverage.misfits if info.coverage is not None else {}
    if misfits:
        console.print(f"[yellow]{len(misfits)} layer(s) match a module name but not its shape:[/yellow]")
        for name, why in list(misfits.items())[:20]:
            console.print(f"  {name}: {why}")
    if info.metadata:
        meta = Table(title="metadata", show_header=False)
        for key, value in sorted(info.metadata.items()):
            meta.add_row(key, value if len(value) < 120 else value[:117] + "...")
        console.print(meta)
    report = info.report
    problems = {**report["unsupported"], **report["invalid"], **{k: "unknown key" for k in report["unknown"]}}
    if problems:
        console.print(f"[yellow]{len(problems)} keys not loaded:[/yellow]")
        for key, reason in sorted(problems.items()):
            console.print(f"  {key}: {reason}")


def _candidate(c: dict) -> str:
    """``flux1 1.0 (fit 1.0, landed 1.0)``: a family an unsure detection could not rule out, with its scores."""
    extra = ", ".join(f"{k} {c[k]}" for k in ("fit", "landed", "complete", "variant") if c.get(k) is not None)
    return f"{c['family']} {c['score']}" + (f" ({extra})" if extra else "")


def _model(model: str):
    from ..pipelines import load_pipeline

    if model == "tiny" or not _is_family(model):
        return load_pipeline(model)
    return model  # a family name: inspect builds its meta-device model


def _is_family(name: str) -> bool:
    from ..families.offline import FAMILY_NAMES

    return name.lower() in FAMILY_NAMES


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "fmt", type=click.Choice(["kohya", "peft", "nunchaku"]), default=None,
              help="Output naming convention (default: kohya; peft for a PEFT input). nunchaku needs --quant-model.")
@click.option("--dtype", default=None,
              help="fp16, bf16, fp32 (cast) or fp8, int8 (factors quantized with per-row scales).")
@click.option("--model", default=None,
              help="Diffusers folder, 'tiny[-FAMILY]' or a family/variant name (flux1, sdxl, sd15, wan2.1-t2v-1.3b, ...): "
                   "the modules --to peft names, and the family whose kohya names --to kohya writes (default: "
                   "detected from the file).")
@click.option("--quant-model", default=None,
              help="--to nunchaku: the Nunchaku SVDQuant FLUX transformer (.safetensors) the LoRA is for.")
def convert_cmd(src: str, dst: str, fmt: str | None, dtype: str | None, model: str | None,
                quant_model: str | None) -> None:
    """Rewrite a LoRA in kohya/A1111/ComfyUI, diffusers/PEFT or Nunchaku form, optionally with fp8/int8 factors
    (atomic; never over the input).

    --to kohya writes the names kohya's trainers write for the family (sd-scripts / musubi-tuner): FLUX.1
    lora_unet_double_blocks_0_img_attn_qkv (fused q/k/v), SDXL lora_unet_input_blocks_4_1_..., Wan
    lora_unet_blocks_0_self_attn_q, SD 1.x the diffusers names flattened; always with .alpha.

    \b
        lorakit convert style.safetensors style-peft.safetensors --to peft --model ./my-sd15
        lorakit convert style-peft.safetensors style-kohya.safetensors --to kohya --dtype fp16
        lorakit convert flux-peft.safetensors flux-kohya.safetensors --to kohya --model flux1
        lorakit convert style.safetensors style-int8.safetensors --dtype int8
        lorakit convert flux-style.safetensors svdq-style.safetensors --to nunchaku --quant-model svdq-int4.safetensors
    """
    from .. import load, save

    lora = load(src)
    if fmt == "nunchaku":
        from ..quant.nunchaku import to_nunchaku

        if not quant_model:
            raise click.UsageError("--to nunchaku needs --quant-model (the SVDQuant transformer file)")
        report = to_nunchaku(lora, quant_model, dst, model=_model(model) if model else None, inputs=[src])
        click.echo("\n".join(report.lines()))
        return
    fmt = fmt or ("peft" if lora.format == "peft" else "kohya")
    target = _model(model) if model else None
    out = save(lora, dst, fmt, dtype=dtype, model=target)
    problems = lora.report.problems()
    click.echo(f"wrote {out} ({fmt}, {len(lora)} layers)")
    if dtype and dtype.lower() in ("fp8", "int8"):
        from ..quant.lorafile import quantized_file_report

        click.echo("\n".join(quantized_file_report(lora, out, fmt, model=target).lines()))
    if problems:
        click.echo(f"{len(problems)} keys of {src} were not loaded and are not in the output: "
                   + ", ".join(sorted(problems)[:10]), err=True)
