"""Write a canonical LoRA as a kohya/LyCORIS file (ComfyUI, A1111, kohya read it) or a diffusers/PEFT
file (``load_lora_weights`` / ``load_lora_adapter`` read it), atomically and never over an input.

The writer spells names that are already resolved; it never resolves them (``lorakit.save(..., model=...)``
moves a LoRA into a model's layout first). PEFT alpha: kept exact in the ``lora_adapter_metadata`` header
(``lora_alpha`` = the most common alpha, ``alpha_pattern``/``rank_pattern`` for the others), the way
diffusers' own ``save_lora_weights`` does.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import MatchError, UnsupportedAdapterError
from ..io import parse_dtype, write_tensors
from ..model import Layer, LoRA
from .conventions import KOHYA_TRANSFORMER, NATIVE_PREFIX, PEFT_TRANSFORMER, WRAPPERS, kohya_name, peft_prefix

__all__ = ["FORMATS", "check_peft_expressible", "save", "to_state_dict"]

#: the conventions lorakit writes
FORMATS = ("kohya", "peft")

# (IA)^3's vector is LyCORIS' bare ".weight", read back beside its ".on_input" flag (conventions.SIBLING_FIELDS)
_KOHYA_FIELDS = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "ia3_weight": "weight",
                 # BOFT and kohya OFT keep LyCORIS'/sd-scripts' ".oft_blocks" (told apart by shape / prefix on reading)
                 "boft_blocks": "oft_blocks", "kohya_oft_blocks": "oft_blocks",
                 **{f"glora_{p}": f"{p}.weight" for p in ("a1", "a2", "b1", "b2", "bm")}}
_PEFT_FIELDS = {"down": "lora_A.weight", "up": "lora_B.weight", "up_bias": "lora_B.bias"}

# Native (ComfyUI / LightX2V / BFL) names are kept as written: those tools read kohya suffixes on them.
# ComfyUI's ``text_encoders.<name>.`` head covers every text encoder.
_NATIVE_STARTS = (*NATIVE_PREFIX["denoiser"], "text_encoders.")

# Diffusers-named transformer layers (FLUX/SD3 ``transformer.`` files): OneTrainer's ``lora_transformer_`` in
# kohya files (ComfyUI reads that as diffusers names, while its ``lora_unet_`` means BFL/MMDiT names), and
# ``transformer.`` in PEFT files when the caller does not say which denoiser prefix to use.
_TRANSFORMER_STARTS = (PEFT_TRANSFORMER, *(w + PEFT_TRANSFORMER for w in WRAPPERS), KOHYA_TRANSFORMER)

Put = Callable[[str, torch.Tensor], None]


def _kohya_key(layer: Layer, single_te: bool) -> str:
    if layer.component is None or layer.name.startswith(_NATIVE_STARTS):
        return layer.name
    own = getattr(layer.weight, "kohya_prefix", None)  # an adapter saved under its trainer's prefix (kohya OFT)
    if own is not None and layer.component == "denoiser":
        return own + layer.path.replace(".", "_")
    transformer = layer.name.startswith(_TRANSFORMER_STARTS)
    return kohya_name(layer.component, layer.path, single_te=single_te, transformer=transformer)


def _kohya_state_dict(lora: LoRA, put: Put, out: dict[str, torch.Tensor]) -> None:
    """Kohya/LyCORIS keys: ``<prefix><flat path>.<suffix>``; bias and modulation deltas as ``diff_b``/``diff_m``."""
    single_te = not any(layer.component in ("text_encoder_2", "text_encoder_3") for layer in lora)
    for layer in lora:
        base = _kohya_key(layer, single_te)
        if layer.weight is not None:
            tensors = layer.weight.tensors()
            up_bias = tensors.pop("up_bias", None)
            for field, t in tensors.items():
                put(f"{base}.{_KOHYA_FIELDS.get(field, field)}", t)
            alpha = layer.weight.alpha
            if alpha is None and layer.weight.kind == "lora":
                alpha = layer.weight.rank  # kohya always writes alpha; none means a scale of 1, i.e. alpha = rank
            if alpha is not None:
                out[f"{base}.alpha"] = torch.tensor(float(alpha))
            on_input = getattr(layer.weight, "on_input", None)  # (IA)^3's side flag: a flag, not a parameter
            if on_input is not None:
                out[f"{base}.on_input"] = on_input
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


def _kohya_dora(layer: Layer) -> torch.Tensor:
    dora = layer.dora
    mag = dora.magnitude
    ndim = layer.weight.delta_weight().dim() if layer.weight is not None else 2
    if dora.axis == "out":
        return mag.reshape(-1, *([1] * (ndim - 1)))
    return mag.reshape(1, -1, *([1] * (ndim - 2)))


def check_peft_expressible(lora: LoRA) -> None:
    """Raise :class:`UnsupportedAdapterError` for the first layer a PEFT LoRA file cannot express (only plain
    low-rank pairs, with an optional ``lora_B`` bias and DoRA magnitude, can be)."""
    for layer in lora:
        # the PEFT spellings are data (_PEFT_FIELDS): a layer fits when every tensor it holds has one
        fields = set(layer.weight.tensors()) if layer.weight is not None else set()
        if not fields or not fields <= set(_PEFT_FIELDS) or layer.bias is not None or layer.params:
            kinds = ", ".join(layer.kinds) + (" (Tucker)" if "mid" in fields else "")
            raise UnsupportedAdapterError(
                f"{layer.name}: PEFT LoRA files cannot express {kinds}; save with format='kohya' instead."
            )


def _peft_key(layer: Layer, denoiser_prefix: str | None) -> str:
    """``<component prefix><dotted module path>`` (the bare path for a layer with no component)."""
    if layer.flat:
        raise MatchError(
            f"{layer.name}: cannot turn the flattened name into a module path for PEFT; "
            "pass the model (--model DIR|tiny) the LoRA was trained for."
        )
    if layer.component == "denoiser" and denoiser_prefix is not None:
        return denoiser_prefix + layer.path
    transformer = layer.component == "denoiser" and layer.name.startswith(_TRANSFORMER_STARTS)
    return peft_prefix(layer.component, transformer=transformer) + layer.path


def _peft_state_dict(lora: LoRA, put: Put, denoiser_prefix: str | None) -> str | None:
    """Write the PEFT tensors through ``put``; returns the ``lora_adapter_metadata`` JSON (None: no layers)."""
    check_peft_expressible(lora)
    keys = {layer.name: _peft_key(layer, denoiser_prefix) for layer in lora}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    use_dora = lora_bias = False
    for layer in lora:
        w = layer.weight
        full = keys[layer.name]
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
    if not alphas:
        return None
    # the config is keyed by the prefix the file really uses ("unet" or "transformer" for the denoiser)
    comp_of = {keys[ly.name]: (keys[ly.name].split(".", 1)[0] if ly.component else None) for ly in lora}
    return json.dumps(_peft_config(alphas, ranks, comp_of, use_dora=use_dora, lora_bias=lora_bias), sort_keys=True)


def _peft_config(
    alphas: dict[str, float], ranks: dict[str, int], comp_of: dict[str, str | None], *, use_dora: bool, lora_bias: bool,
) -> dict[str, object]:
    """diffusers' adapter config per component prefix: the most common rank/alpha plus patterns for the rest."""
    cfg: dict[str, object] = {}
    for comp in dict.fromkeys(comp_of.values()):
        keys = [k for k in alphas if comp_of[k] == comp]
        local = {k: (k.split(".", 1)[1] if comp else k) for k in keys}
        r = Counter(ranks[k] for k in keys).most_common(1)[0][0]
        a = Counter(alphas[k] for k in keys).most_common(1)[0][0]
        sub = {
            "r": r,
            "lora_alpha": a,
            "rank_pattern": {local[k]: ranks[k] for k in keys if ranks[k] != r},
            "alpha_pattern": {local[k]: alphas[k] for k in keys if alphas[k] != a},
            # full module paths, as diffusers writes them: a bare "linear" would make PEFT wrap every
            # module of that name, most of which this file has no weights for
            "target_modules": sorted(set(local.values())),
            "use_dora": use_dora,
            "lora_bias": lora_bias,
        }
        for k, v in sub.items():
            cfg[f"{comp}.{k}" if comp else k] = v
    return cfg


def to_state_dict(
    lora: LoRA, format: str = "kohya", *, dtype: torch.dtype | str | None = None, denoiser_prefix: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`save` would write. PEFT: every layer must already carry a dotted module
    path (resolve flattened names with ``lorakit.save(..., model=...)``); ``denoiser_prefix`` (``"unet."`` or
    ``"transformer."``) overrides the denoiser prefix, which otherwise follows the file's own."""
    if format not in FORMATS:
        raise ValueError(f"format must be 'kohya' or 'peft', got {format!r}")
    dtype = parse_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    meta = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}

    def put(key: str, t: torch.Tensor) -> None:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t

    if format == "kohya":
        _kohya_state_dict(lora, put, out)
    else:
        config = _peft_state_dict(lora, put, denoiser_prefix)
        if config is not None:
            meta["lora_adapter_metadata"] = config
    return out, meta


def save(
    lora: LoRA,
    path: str | os.PathLike[str],
    format: str = "kohya",
    *,
    dtype: torch.dtype | str | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    denoiser_prefix: str | None = None,
) -> Path:
    """Write ``lora`` to ``path`` (safetensors) in ``format`` ("kohya" or "peft") with its names as they are.
    Atomic; refuses to overwrite the file the LoRA was loaded from or any path in ``inputs``."""
    tensors, meta = to_state_dict(lora, format, dtype=dtype, denoiser_prefix=denoiser_prefix)
    return write_tensors(tensors, path, meta, inputs=[lora.source, *inputs])
