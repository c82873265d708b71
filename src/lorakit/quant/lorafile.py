"""Quantized LoRA files (``lorakit.save(..., dtype="fp8"|"int8")``): how much smaller they are than the bf16 file
and how far each layer's ΔW moved. The storage itself (per-row scales, metadata) is :func:`lorakit.io.quantize_tensors`;
:func:`lorakit.io.read_tensors` dequantizes on load."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from ..formats import load
from ..io import QUANT_META_KEY, read_metadata
from ..model import LoRA
from ..saving import save

__all__ = ["QuantFileReport", "quantized_file_report", "save_quantized"]


@dataclasses.dataclass
class QuantFileReport:
    """Size of a quantized LoRA file next to the same LoRA in bf16, and the relative Frobenius error
    ``‖ΔW_q − ΔW‖ / ‖ΔW‖`` of every layer (ΔW of the float LoRA as given, ΔW_q of the file as loaded)."""

    path: str
    scheme: str
    size: int
    bf16_size: int
    errors: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.size / self.bf16_size if self.bf16_size else float("nan")

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    def lines(self) -> list[str]:
        worst = max(self.errors, key=self.errors.__getitem__) if self.errors else "-"
        return [
            f"{self.scheme}: {self.size:,} bytes vs {self.bf16_size:,} bytes in bf16 ({self.ratio:.2f}x)",
            f"relative error of each layer's ΔW over {len(self.errors)} layers: mean {self.mean_error:.2e}, "
            f"max {self.max_error:.2e} ({worst})",
        ]

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "scheme": self.scheme, "size": self.size, "bf16_size": self.bf16_size,
                "ratio": self.ratio, "mean_error": self.mean_error, "max_error": self.max_error, "errors": self.errors}


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None or a.shape != b.shape:
        return None
    ref = b.float().norm()
    return float((a.float() - b.float()).norm() / ref) if ref > 0 else float((a.float()).norm())


def quantized_file_report(lora: LoRA, path: str | os.PathLike[str], format: str = "kohya", *,
                          model: object | None = None) -> QuantFileReport:
    """Compare the quantized file at ``path`` with ``lora`` (the float LoRA it was written from, in ``format`` and
    for ``model`` as given to ``save``): the same LoRA is written in bf16 and in fp32 to a temporary folder, for the
    size and the reference ΔW of each layer under the file's own names."""
    path = Path(path)
    meta = read_metadata(path)
    if QUANT_META_KEY not in meta:
        raise ValueError(f"{path} is not a quantized LoRA file (no {QUANT_META_KEY} metadata)")
    scheme = json.loads(meta[QUANT_META_KEY])["scheme"]
    with tempfile.TemporaryDirectory(prefix="lorakit-qref-") as tmp:
        bf16 = save(lora, Path(tmp) / "bf16.safetensors", format, dtype="bf16", model=model)
        ref = save(lora, Path(tmp) / "fp32.safetensors", format, dtype="fp32", model=model)
        bf16_size = bf16.stat().st_size
        reference = {layer.name: layer.delta_weight() for layer in load(ref)}
    errors: dict[str, float] = {}
    for layer in load(path):
        err = _rel(layer.delta_weight(), reference.get(layer.name))
        if err is not None:
            errors[layer.name] = err
    return QuantFileReport(str(path), scheme, path.stat().st_size, bf16_size, errors)


def save_quantized(lora: LoRA, path: str | os.PathLike[str], dtype: str, format: str = "kohya", *,
                   model: object | None = None) -> QuantFileReport:
    """``lorakit.save(lora, path, format, dtype=dtype)`` with ``dtype`` "fp8" or "int8", then its report."""
    out = save(lora, path, format, dtype=dtype, model=model)
    return quantized_file_report(lora, out, format, model=model)
