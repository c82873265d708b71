"""``lorakit.save``: resolve, then write. Kohya files keep the LoRA's own names; PEFT files name the target
model's modules, so the LoRA is first moved into the model's layout (or the detected family's meta model's)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError, MatchError
from .families import Resolver, components_of, detect_family
from .families.offline import meta_components
from .formats.conventions import peft_prefix
from .formats.writer import check_peft_expressible, to_state_dict
from .formats.writer import save as write
from .io import PICKLE_SUFFIXES, QUANT_SCHEMES, check_output, parse_dtype, quantize_tensors, write_tensors
from .model import LoRA
from .placement.layout import to_model_layout

__all__ = ["save"]


def save(
    lora: LoRA,
    path: str | os.PathLike[str],
    format: str = "kohya",
    *,
    dtype: torch.dtype | str | None = None,
    model: nn.Module | Mapping[str, nn.Module] | str | object | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Write ``lora`` to ``path`` (safetensors) in ``format`` ("kohya" or "peft"). Atomic; refuses to
    overwrite the file the LoRA was loaded from or any path in ``inputs``.

    ``dtype`` ("fp16", "bf16", "fp32", ... or a torch dtype) casts float tensors; ``"fp8"`` / ``"int8"`` store
    the factors quantized with a float32 scale per row (see :func:`lorakit.io.quantize_tensors`; ``lorakit.load``
    dequantizes them). ``model`` (a pipeline, a module, ``{component: module}`` or a family name such as
    ``"flux1"``) names the modules a PEFT file is written for; without one, the family detected from the file's
    names is used. Kohya files need no model."""
    quant = _quant_scheme(dtype, path)
    dtype = None if quant else parse_dtype(dtype)
    if format != "peft":
        if quant:
            return _write_quantized(lora, path, format, quant, inputs, None)
        return write(lora, path, format, dtype=dtype, inputs=inputs)
    check_peft_expressible(lora)  # say what cannot be expressed before building a model to resolve names
    comps = None if model is None else _components(model, lora)
    lora = _in_model_layout(lora, comps)
    lora = _flat_names_resolved(lora, comps)
    prefix = None if model is None else peft_prefix("denoiser", transformer=_denoiser_is_transformer(model, comps))
    if quant:
        return _write_quantized(lora, path, "peft", quant, inputs, prefix)
    return write(lora, path, "peft", dtype=dtype, inputs=inputs, denoiser_prefix=prefix)


def _quant_scheme(dtype: object, path: str | os.PathLike[str]) -> str | None:
    """``"fp8"``/``"int8"`` (or ``torch.float8_e4m3fn``/``torch.int8``) -> that scheme; float dtypes -> None. An
    unknown name raises :class:`FormatError` listing every choice; a pickle target cannot carry the scheme."""
    if dtype in (torch.int8, getattr(torch, "float8_e4m3fn", None)):
        dtype = "int8" if dtype is torch.int8 else "fp8"
    if not isinstance(dtype, str) or dtype.lower() not in QUANT_SCHEMES:
        if isinstance(dtype, str):
            try:
                parse_dtype(dtype)
            except FormatError:
                raise FormatError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16 (float) or "
                                  f"{', '.join(QUANT_SCHEMES)} (quantized factors with per-row scales)") from None
        return None
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: dtype={dtype!r} needs a .safetensors output (its metadata names the scheme)")
    return dtype.lower()


def _write_quantized(lora: LoRA, path: str | os.PathLike[str], format: str, scheme: str,
                     inputs: Iterable[str | os.PathLike[str] | None], prefix: str | None) -> Path:
    """The writer's tensors, factors quantized per row, written atomically (never over an input)."""
    check_output(path, [lora.source, *inputs])  # before the work
    tensors, meta = to_state_dict(lora, format, denoiser_prefix=prefix)
    tensors, meta = quantize_tensors(tensors, meta, scheme)
    return write_tensors(tensors, path, meta, inputs=[lora.source, *inputs])


def _wanted(lora: LoRA) -> tuple[str, ...]:
    """The components to build on the meta device: the file's own and the denoiser (a T5 costs seconds)."""
    return tuple({layer.component for layer in lora if layer.component} | {"denoiser"})


def _components(model: object, lora: LoRA) -> dict[str, nn.Module]:
    if isinstance(model, str):  # a family name ("flux1", "sdxl", ...): its modules on the meta device
        return meta_components(model, _wanted(lora))
    return components_of(model)


def _in_model_layout(lora: LoRA, comps: dict[str, nn.Module] | None) -> LoRA:
    """PEFT files name the model's own modules: resolve the file's names (trainer/original namespaces, fused
    projections) against the model, or against the detected family's meta-device model when none is given."""
    if comps is None:
        family = detect_family(lora)
        if family is None:
            return lora  # no family namespace to translate; flat names are resolved below
        comps = meta_components(family, _wanted(lora))
    denoiser = comps.get("denoiser")
    prefix = peft_prefix("denoiser", transformer=denoiser is None or "UNet" not in type(denoiser).__name__)
    moved, _unmatched = to_model_layout(lora, Resolver(comps), denoiser_prefix=prefix)
    return moved


def _flat_names_resolved(lora: LoRA, comps: dict[str, nn.Module] | None) -> LoRA:
    """Flattened (kohya) names still left get their dotted module path from the model (SD 1.5's modules when
    there is no model and no family: those are the files that carry no other hint)."""
    if not any(layer.flat for layer in lora):
        return lora
    if comps is None:
        comps = meta_components(detect_family(lora) or "sd15", _wanted(lora))
    resolver = Resolver(comps)
    layers = {}
    for name, layer in lora.layers.items():
        if layer.flat:
            targets = resolver.lookup(layer)
            if not targets or len(targets) != 1 or targets[0].src_rows or targets[0].dst_rows:
                raise MatchError(
                    f"{layer.name}: cannot turn the flattened name into a module path for PEFT; "
                    "pass the model (--model DIR|tiny) the LoRA was trained for."
                )
            layer = dataclasses.replace(layer, path=targets[0].module, flat=False)
        layers[name] = layer
    return dataclasses.replace(lora, layers=layers)


def _denoiser_is_transformer(model: object, comps: Mapping[str, nn.Module]) -> bool:
    """Whether the model's denoiser is written under ``transformer.`` rather than ``unet.``: the pipeline's
    attribute says so, else the denoiser's class name does."""
    if isinstance(model, str):
        model = comps
    parts = model if isinstance(model, Mapping) else getattr(model, "components", None)
    if isinstance(parts, Mapping):
        if parts.get("transformer") is not None:
            return True
        if parts.get("unet") is not None:
            return False
        model = parts.get("denoiser")
    return "Transformer" in type(model).__name__
