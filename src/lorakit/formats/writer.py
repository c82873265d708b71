"""Write a canonical LoRA as a kohya/LyCORIS file (ComfyUI, A1111, kohya read it) or a diffusers/PEFT
file (``load_lora_weights`` / ``load_lora_adapter`` read it), atomically and never over an input.

PEFT alpha: kept exact in the ``lora_adapter_metadata`` header (``lora_alpha`` = the most common alpha,
``alpha_pattern``/``rank_pattern`` for the others), the way diffusers' own ``save_lora_weights`` does.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import MatchError, UnsupportedAdapterError
from ..io import write_tensors
from ..model import Layer, LoRA

__all__ = ["KOHYA_PREFIX", "PEFT_PREFIX", "save", "to_state_dict"]

KOHYA_PREFIX = {
    "denoiser": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}
PEFT_PREFIX = {
    "denoiser": "unet.",
    "text_encoder": "text_encoder.",
    "text_encoder_2": "text_encoder_2.",
    "text_encoder_3": "text_encoder_3.",
}
_KOHYA_FIELDS = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}
_PEFT_FIELDS = {"down": "lora_A.weight", "up": "lora_B.weight", "up_bias": "lora_B.bias"}


# Native (ComfyUI / LightX2V / BFL) names are kept as written: those tools read kohya suffixes on them.
_NATIVE_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "text_encoders.")


# Diffusers-named transformer layers (FLUX/SD3 ``transformer.`` files) go under OneTrainer's
# ``lora_transformer_``: ComfyUI reads that as diffusers names, while its ``lora_unet_`` means BFL/MMDiT names.
_TRANSFORMER_STARTS = ("transformer.", "base_model.model.transformer.", "lora_transformer_")


def _kohya_name(layer: Layer, single_te: bool) -> str:
    if layer.component is None or layer.name.startswith(_NATIVE_PREFIXES):
        return layer.name
    prefix = KOHYA_PREFIX[layer.component]
    if layer.component == "denoiser" and layer.name.startswith(_TRANSFORMER_STARTS):
        prefix = "lora_transformer_"
    if layer.component == "text_encoder" and single_te:
        prefix = "lora_te_"
    return prefix + layer.path.replace(".", "_")


def to_state_dict(
    lora: LoRA, format: str = "kohya", *, dtype: torch.dtype | None = None, model: object | None = None,
    denoiser_prefix: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`save` would write."""
    if format not in ("kohya", "peft"):
        raise ValueError(f"format must be 'kohya' or 'peft', got {format!r}")
    if isinstance(model, str):  # a family name ("flux1", "sdxl", ...): its modules on the meta device
        from ..families.offline import meta_components

        wanted = tuple({layer.component for layer in lora if layer.component} | {"denoiser"})
        model = meta_components(model, wanted)
    out: dict[str, torch.Tensor] = {}
    meta = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}

    def put(key: str, t: torch.Tensor) -> None:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t

    if format == "kohya":
        single_te = not any(layer.component in ("text_encoder_2", "text_encoder_3") for layer in lora)
        for layer in lora:
            base = _kohya_name(layer, single_te)
            if layer.weight is not None:
                tensors = layer.weight.tensors()
                up_bias = tensors.pop("up_bias", None)
                for field, t in tensors.items():
                    put(f"{base}.{_KOHYA_FIELDS.get(field, field)}", t)
                if layer.weight.alpha is not None:
                    out[f"{base}.alpha"] = torch.tensor(float(layer.weight.alpha))
                if up_bias is not None:
                    # kohya has no lora_B.bias spelling: write the same bias delta as diff_b.
                    bias = up_bias.float() * layer.weight.scale
                    if layer.bias is not None:
                        bias = bias + layer.bias.float()
                    put(f"{base}.diff_b", bias.to(up_bias.dtype))
                elif layer.bias is not None:
                    put(f"{base}.{layer.bias_key}", layer.bias)
            elif layer.bias is not None:
                put(f"{base}.{layer.bias_key}", layer.bias)
            if layer.dora is not None:
                put(f"{base}.dora_scale", _kohya_dora(layer))
            for name, t in layer.params.items():
                if name != "modulation":
                    raise UnsupportedAdapterError(f"{layer.name}: no kohya spelling for a delta on {name!r}")
                put(f"{base}.diff_m", t)
        return out, meta

    for layer in lora:  # say what cannot be expressed before asking for a model to resolve names
        w = layer.weight
        if w is None or w.kind != "lora" or getattr(w, "mid", None) is not None or layer.bias is not None or layer.params:
            kinds = ", ".join(layer.kinds) + (" (Tucker)" if getattr(w, "mid", None) is not None else "")
            raise UnsupportedAdapterError(
                f"{layer.name}: PEFT LoRA files cannot express {kinds}; save with format='kohya' instead."
            )
    lora = _in_model_layout(lora, model)
    names = _dotted_names(lora, model)
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    use_dora = lora_bias = False
    for layer in lora:
        w = layer.weight
        full = names[layer.name]
        for field, t in w.tensors().items():
            put(f"{full}.{_PEFT_FIELDS[field]}", t)
        lora_bias |= w.up_bias is not None
        if layer.dora is not None:
            if layer.dora.axis != "out":
                raise UnsupportedAdapterError(
                    f"{layer.name}: DoRA normalised per input column cannot be written as PEFT "
                    "lora_magnitude_vector (per output row); save with format='kohya' instead."
                )
            mag = layer.dora.magnitude.reshape(-1)
            if w.down.dim() == 4:
                mag = mag.reshape(1, -1, 1, 1)
            put(f"{full}.lora_magnitude_vector", mag)
            use_dora = True
        alphas[full] = float(w.alpha) if w.alpha is not None else float(w.rank)
        ranks[full] = w.rank
    if alphas:
        # the config is keyed by the prefix the file really uses ("unet" or "transformer" for the denoiser)
        comp_of = {names[ly.name]: (names[ly.name].split(".", 1)[0] if ly.component else None) for ly in lora}
        cfg: dict[str, object] = {}
        for comp in dict.fromkeys(comp_of.values()):
            keys = [k for k in alphas if comp_of[k] == comp]
            local = (lambda k: k.split(".", 1)[1]) if comp else (lambda k: k)  # noqa: E731
            r = Counter(ranks[k] for k in keys).most_common(1)[0][0]
            a = Counter(alphas[k] for k in keys).most_common(1)[0][0]
            sub = {
                "r": r,
                "lora_alpha": a,
                "rank_pattern": {local(k): ranks[k] for k in keys if ranks[k] != r},
                "alpha_pattern": {local(k): alphas[k] for k in keys if alphas[k] != a},
                # full module paths, as diffusers writes them: a bare "linear" would make PEFT wrap every
                # module of that name, most of which this file has no weights for
                "target_modules": sorted({local(k) for k in keys}),
                "use_dora": use_dora,
                "lora_bias": lora_bias,
            }
            for k, v in sub.items():
                cfg[f"{comp}.{k}" if comp else k] = v
        meta["lora_adapter_metadata"] = json.dumps(cfg, sort_keys=True)
    return out, meta


def _kohya_dora(layer: Layer) -> torch.Tensor:
    dora = layer.dora
    mag = dora.magnitude
    ndim = layer.weight.delta_weight().dim() if layer.weight is not None else 2
    if dora.axis == "out":
        return mag.reshape(-1, *([1] * (ndim - 1)))
    return mag.reshape(1, -1, *([1] * (ndim - 2)))


def _dotted_names(lora: LoRA, model: object | None) -> dict[str, str]:
    """Layer name -> ``<component prefix><dotted module path>``; flat names are resolved against a model."""
    out: dict[str, str] = {}
    resolver = _resolver_for(model, lora) if any(layer.flat for layer in lora) else None
    for layer in lora:
        # a layer with no component (a plain state dict) keeps its bare module path
        comp_prefix = "" if layer.component is None else PEFT_PREFIX[layer.component]
        if layer.component == "denoiser" and _denoiser_is_transformer(layer, model):
            comp_prefix = "transformer."
        path = layer.path
        if layer.flat:
            targets = resolver.lookup(layer)
            if not targets or len(targets) != 1 or targets[0].src_rows or targets[0].dst_rows:
                raise MatchError(
                    f"{layer.name}: cannot turn the flattened name into a module path for PEFT; "
                    "pass the model (--model DIR|tiny) the LoRA was trained for."
                )
            path = targets[0].module
        out[layer.name] = comp_prefix + path
    return out


def _denoiser_is_transformer(layer: Layer, model: object | None) -> bool:
    """Whether the PEFT prefix of a denoiser layer is ``transformer.`` rather than ``unet.``: the model says
    so when given, else the file's own prefix does (a ``transformer.`` file stays one)."""
    if model is None:
        return layer.name.startswith(_TRANSFORMER_STARTS)
    comps = model if isinstance(model, Mapping) else getattr(model, "components", None)
    if isinstance(comps, Mapping):
        if comps.get("transformer") is not None:
            return True
        if comps.get("unet") is not None:
            return False
        model = comps.get("denoiser")
    return "Transformer" in type(model).__name__


def _in_model_layout(lora: LoRA, model: object | None) -> LoRA:
    """PEFT files name the model's own modules: resolve the file's names (trainer/original namespaces, fused
    projections) against the model, or against the detected family's meta-device model when none is given."""
    family = None
    if model is None:
        from ..families import detect_family

        family = detect_family(lora)
        if family is None:
            return lora  # no family namespace to translate; flat names are resolved by _dotted_names
    from ..placement.layout import to_model_layout
    from ..runtime.resolve import Resolver, components_of

    if model is not None:
        comps = components_of(model)
    else:
        from ..families.offline import meta_components

        wanted = tuple({layer.component for layer in lora if layer.component} | {"denoiser"})
        comps = meta_components(family, wanted)
    denoiser = comps.get("denoiser")
    prefix = "unet." if denoiser is not None and "UNet" in type(denoiser).__name__ else "transformer."
    moved, _unmatched = to_model_layout(lora, Resolver(comps), denoiser_prefix=prefix)
    return moved


def _resolver_for(model: object | None, lora: LoRA):
    from ..runtime.resolve import Resolver, components_of

    if model is None:
        from ..families import detect_family
        from ..families.offline import meta_components

        wanted = tuple({layer.component for layer in lora if layer.component} | {"denoiser"})
        return Resolver(meta_components(detect_family(lora) or "sd15", wanted))
    return Resolver(components_of(model))


def save(
    lora: LoRA,
    path: str | os.PathLike[str],
    format: str = "kohya",
    *,
    dtype: torch.dtype | str | None = None,
    model: nn.Module | object | None = None,
    inputs=(),
) -> Path:
    """Write ``lora`` to ``path`` (safetensors) in ``format`` ("kohya" or "peft"). Atomic; refuses to
    overwrite the file the LoRA was loaded from or any path in ``inputs``."""
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors, meta = to_state_dict(lora, format, dtype=dtype, model=model)
    return write_tensors(tensors, path, meta, inputs=[lora.source, *inputs])
