"""``lorakit.save``: resolve, then write. PEFT files name the target model's modules, so the LoRA is first moved
into the model's layout (or the detected family's meta model's). Kohya files name the modules as kohya's trainers
do for the family (sd-scripts / musubi-tuner: the original model's names, fused projections fused), so the LoRA is
moved into the model's layout and then into the original one (:mod:`lorakit.placement.kohya_layout`); a file whose
family is unknown keeps its own names."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import FormatError, MatchError, ShapeMismatchError
from .families import Resolver, components_of, detect_family
from .families.kohya_names import DIFFUSERS_NAMED, KohyaNames
from .families.offline import VARIANTS, meta_components, variant_for
from .formats.conventions import peft_prefix
from .formats.writer import check_peft_expressible, to_state_dict
from .formats.writer import save as write
from .io import PICKLE_SUFFIXES, QUANT_SCHEMES, check_output, parse_dtype, quantize_tensors, write_tensors
from .model import LoRA
from .placement.kohya_layout import to_kohya_layout
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

    ``dtype`` ("fp16", "bf16", "fp32", ... or a torch dtype) casts float tensors. ``model`` (a pipeline, a module,
    ``{component: module}`` or a family name such as ``"flux1"``) names the modules a PEFT file is written for;
    without one, the family detected from the file's names is used. Kohya files get the names kohya's trainers
    write for that family (FLUX.1 ``lora_unet_double_blocks_0_img_attn_qkv``, SDXL ``lora_unet_input_blocks_...``,
    Wan ``lora_unet_blocks_0_self_attn_q``, SD 1.x the diffusers names flattened); with no model and no detected
    family they keep the file's own names. ``dtype="fp8"`` / ``"int8"`` store the factors quantized with a float32
    scale per row (see :func:`lorakit.io.quantize_tensors`; ``lorakit.load`` dequantizes them)."""
    quant = _quant_scheme(dtype, path)
    dtype = None if quant else parse_dtype(dtype)
    if format == "kohya":
        lora = _in_kohya_layout(lora, model)
        if quant:
            return _write_quantized(lora, path, format, quant, inputs, None)
        return write(lora, path, format, dtype=dtype, inputs=inputs)
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


def _in_kohya_layout(lora: LoRA, model: object) -> LoRA:
    """The LoRA in the names kohya's trainers write for its family (unchanged when no family is known).

    Without a model, the family's published models (default variant first) name the modules; the first whose
    shapes fit every layer is used. A LoRA that fits none (a tiny or custom-size model) keeps its own names, with a
    warning: original names depend on the model (SGM block numbers on the UNet's layout, fused rows on its
    widths), so guessing could misname layers."""
    family = _kohya_family(lora, model)
    if family is None:
        return lora
    if model is not None:
        comps = _components(model, lora)
        return to_kohya_layout(_moved(lora, comps), KohyaNames(comps, family), comps)
    moved, comps, misfit = _first_fit(lora, family)
    if moved is not None:
        return to_kohya_layout(moved, KohyaNames(comps, family), comps)
    warnings.warn(f"{misfit}: the LoRA does not fit any published {family} model, so the names kohya's trainers "
                  "would give its layers are unknown; keeping the file's own names (flattened). Pass the model "
                  "(convert --model DIR|tiny-<family>, save(model=...)) to write kohya's names.", stacklevel=3)
    return lora


def _variants(family: str) -> list[str]:
    """The family's published models on the meta device, its default first (``wan``: 14B, then 1.3B, ...)."""
    default = variant_for(family)
    return [default, *sorted(v for v in VARIANTS if v.startswith(family) and v != default)]


def _moved(lora: LoRA, comps: Mapping[str, nn.Module]) -> LoRA:
    denoiser = comps.get("denoiser")
    prefix = peft_prefix("denoiser", transformer=denoiser is None or "UNet" not in type(denoiser).__name__)
    moved, _unmatched = to_model_layout(lora, Resolver(comps), denoiser_prefix=prefix)
    return moved


def _misfit(lora: LoRA, comps: Mapping[str, nn.Module]) -> str | None:
    """The first layer whose delta does not have its module's weight shape (``None``: all fit)."""
    for layer in lora:
        module = comps.get(layer.component or "")
        weight = None if module is None or layer.flat or layer.weight is None else _weight(module, layer.path)
        if weight is None:
            continue
        if layer.weight.out_features() != weight.shape[0] or layer.weight.delta_numel() != weight.numel():
            return f"{layer.name} ({layer.weight.out_features()} rows for {tuple(weight.shape)})"
    return None


def _weight(root: nn.Module, path: str) -> torch.Tensor | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _kohya_family(lora: LoRA, model: object) -> str | None:
    """The family whose kohya names to write: a family name given as ``model``, else the file's detected family,
    else (a live model) SDXL or SD 1.x from a UNet's cross-attention width; ``None`` when none is known."""
    if isinstance(model, str):
        variant = variant_for(model)
        return "sd1" if variant in ("sd15", "sd2") else variant
    family = detect_family(lora)
    if family is None and model is None and lora.format == "diffusers-old":
        return "sd1"  # attention-processor files (diffusers <= 0.16) are SD 1.x/2.x UNet LoRAs: diffusers names
    if family is not None or model is None:
        return family
    denoiser = components_of(model).get("denoiser")
    if denoiser is None:
        return None
    if "UNet" in type(denoiser).__name__:
        return "sdxl" if getattr(getattr(denoiser, "config", None), "cross_attention_dim", None) == 2048 else "sd1"
    return type(denoiser).__name__


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
        moved, _, _ = _first_fit(lora, family)  # SD3.5 Large's widths after SD3 Medium's
        if moved is not None:
            return moved
        comps = meta_components(family, _wanted(lora))
    return _moved(lora, comps)


def _first_fit(lora: LoRA, family: str) -> tuple[LoRA | None, dict[str, nn.Module], str | None]:
    """``(the LoRA in the model's layout, its components, None)`` on the first published model of ``family``
    (default first) whose shapes fit every layer; ``(None, {}, the first misfit)`` when none does."""
    misfit = None
    for variant in _variants(family):
        comps = meta_components(variant, _wanted(lora))
        try:
            moved = _moved(lora, comps)
        except ShapeMismatchError as exc:
            misfit = misfit or str(exc)
            continue
        wrong = None if family in DIFFUSERS_NAMED else _misfit(moved, comps)
        if wrong is None:
            return moved, comps, None
        misfit = misfit or wrong
    return None, {}, misfit


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
