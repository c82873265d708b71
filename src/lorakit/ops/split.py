"""Split a model checkpoint with LoRA layers inside (a Cosmos Predict2 post-training ``iter_000002000.pt``: the
model's weights, ``x.base_layer.weight`` for each wrapped layer, and ``x.lora_A.default.weight`` /
``x.lora_B.default.weight``) into a LoRA file and, optionally, the plain base checkpoint.

The LoRA part keeps the file's module names (``.default`` dropped) in PEFT form, with its rank and alpha in the
``lora_adapter_metadata`` header that lorakit and diffusers read. Alpha comes from ``alpha``, else from a training
config (``lora_alpha`` / ``lora_rank`` in a JSON or YAML file, at any depth), else alpha = rank, as Cosmos trains.
The base part has every other tensor, with ``.base_layer`` removed from the wrapped layers' names, so that it loads
as the model's own state dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..formats.reader import is_base_weight_file, parse_state_dict
from ..io import check_not_input, read_tensors, resolve_source, write_tensors
from .common import OpResult, Record

__all__ = ["SplitSummary", "read_alpha_config", "split"]


@dataclasses.dataclass(frozen=True)
class SplitSummary(Record):
    lora_layers: int
    lora_keys: int
    base_keys: int
    rank: int
    alpha: float
    alpha_source: str
    lora_parameters: int
    total_parameters: int
    lora_ratio: float
    base_output: str | None


def _find(obj: Any, names: tuple[str, ...]) -> Any:
    if isinstance(obj, dict):
        for name in names:
            if name in obj and isinstance(obj[name], (int, float)) and not isinstance(obj[name], bool):
                return obj[name]
        for value in obj.values():
            hit = _find(value, names)
            if hit is not None:
                return hit
    if isinstance(obj, list):
        for value in obj:
            hit = _find(value, names)
            if hit is not None:
                return hit
    return None


def read_alpha_config(path: str | os.PathLike[str]) -> tuple[float | None, int | None]:
    """``(lora_alpha, lora_rank)`` from a training config (JSON, or YAML when PyYAML is installed), searched at any
    depth (Cosmos nests them under the model config); ``None`` where absent."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError as exc:
            raise FormatError(f"{path}: not JSON, and PyYAML is not installed to read YAML (pip install pyyaml)") \
                from exc
        data = yaml.safe_load(text)
    alpha = _find(data, ("lora_alpha", "alpha"))
    rank = _find(data, ("lora_rank", "rank", "r"))
    return (None if alpha is None else float(alpha)), (None if rank is None else int(rank))


def split(
    source: str | os.PathLike[str],
    lora_out: str | os.PathLike[str],
    base_out: str | os.PathLike[str] | None = None,
    *,
    alpha: float | None = None,
    config: str | os.PathLike[str] | None = None,
) -> OpResult:
    """Write the LoRA layers of checkpoint ``source`` to ``lora_out`` (and its other weights to ``base_out``)."""
    path = resolve_source(source)
    check_not_input(lora_out, [path])
    if base_out is not None:
        check_not_input(base_out, [path, lora_out])
    tensors, _meta = read_tensors(path)
    if not is_base_weight_file(tensors):
        raise FormatError(f"{path}: no PEFT-injected LoRA layers (x.lora_A.default.weight next to "
                          "x.base_layer.weight) found; this is not a checkpoint with a LoRA inside. Use "
                          "`lorakit inspect` to see what it holds.")
    lora = parse_state_dict(tensors, {}, source=str(path))
    rep = lora.report
    if rep.unknown or rep.invalid:
        bad = rep.unknown + list(rep.invalid)
        raise FormatError(f"{path}: {len(bad)} LoRA-looking key(s) do not form layers ({', '.join(bad[:5])}); "
                          "nothing was written")
    ranks = Counter(layer.rank for layer in lora if layer.rank)
    rank = ranks.most_common(1)[0][0] if ranks else 0
    alpha_source = "argument"
    if alpha is None and config is not None:
        alpha, cfg_rank = read_alpha_config(config)
        alpha_source = f"config {config}"
        if cfg_rank is not None and cfg_rank != rank:
            raise FormatError(f"{config}: lora_rank {cfg_rank} does not match the checkpoint's rank {rank}")
    if alpha is None:
        alpha, alpha_source = float(rank), "alpha = rank (Cosmos' default)"
    lora_keys = set(rep.consumed)
    out = {k.replace(".default.", ".").removesuffix(".default"): v.contiguous()
           for k, v in tensors.items() if k in lora_keys}
    adapter = {"r": rank, "lora_alpha": alpha,
               "target_modules": sorted({layer.name.rsplit(".", 1)[-1] for layer in lora}),
               "rank_pattern": {layer.name: layer.rank for layer in lora if layer.rank != rank},
               # alpha = rank holds per layer; a given alpha is one value for every layer (PEFT's meaning)
               "alpha_pattern": {layer.name: float(layer.rank) for layer in lora
                                 if layer.rank != rank and alpha_source.startswith("alpha = rank")}}
    write_tensors(out, lora_out, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(adapter)},
                  inputs=[path])
    base = {k.replace(".base_layer.", "."): v.contiguous() for k, v in tensors.items() if k in set(rep.base_weights)}
    if base_out is not None:
        write_tensors(base, base_out, inputs=[path, lora_out])
    lora_params = sum(v.numel() for v in out.values())
    total = lora_params + sum(v.numel() for v in base.values())
    summary = SplitSummary(
        lora_layers=len(lora), lora_keys=len(out), base_keys=len(base), rank=rank, alpha=float(alpha),
        alpha_source=alpha_source, lora_parameters=lora_params, total_parameters=total,
        lora_ratio=lora_params / total if total else 0.0, base_output=None if base_out is None else str(base_out),
    )
    return OpResult("split", str(lora_out), summary)
