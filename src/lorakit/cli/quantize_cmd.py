"""``lorakit quantize``: write an SVDQuant-style checkpoint, ``W ≈ L·R + Q(W − L·R)`` per linear weight."""

from __future__ import annotations

import json

import click

__all__ = ["quantize_cmd"]


@click.command("quantize")
@click.argument("model")
@click.option("-o", "--output", "output", required=True, help="Output .safetensors file.")
@click.option("--scheme", type=click.Choice(["int8", "fp8"]), default="int8", show_default=True,
              help="Storage of the residual W − L·R (per-row scales).")
@click.option("--lowrank", "rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rank of the 16-bit branch L·R (top singular directions of W).")
@click.option("--exclude", default=r"embed|norm", show_default=True,
              help="Regex of layer names left in floating point.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer errors as one JSON object.")
def quantize_cmd(model: str, output: str, scheme: str, rank: int, exclude: str, as_json: bool) -> None:
    """Quantize the 2-D ``*.weight`` tensors of the checkpoint MODEL (a .safetensors state dict) with a
    low-rank branch. LoRAs then go onto the branch exactly with ``lorakit.quant.apply_branch``.

    \b
    Example:
        lorakit quantize transformer.safetensors -o transformer-int8-r32.safetensors --scheme int8 --lowrank 32
    """
    from safetensors.torch import save_file

    from ..io import atomic_output, read_tensors
    from ..quant.lowrank import quantize_state_dict

    state, _ = read_tensors(model)
    out, metadata, errors = quantize_state_dict(state, scheme, rank, exclude=exclude)
    if not errors:
        raise click.ClickException(f"{model}: no 2-D weight larger than rank {rank} to quantize (check --exclude)")
    with atomic_output(output) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    mean = {k: sum(e[k] for e in errors.values()) / len(errors) for k in ("error", "error_no_branch")}
    if as_json:
        click.echo(json.dumps({"output": output, "layers": len(errors), "mean": mean, "errors": errors}))
        return
    click.echo(f"{output}: {len(errors)} layers {scheme} + rank-{rank} branch; mean relative weight error "
               f"{mean['error']:.4g} with the branch, {mean['error_no_branch']:.4g} without")
