"""Naming conventions as data: one component <-> prefix table per convention, file prefixes (-> component,
flattened or dotted namespace) and adapter suffixes (-> canonical field). Reader, writer, extract and
:func:`kohya_name` all read these tables; detection and grouping are generic code over them.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "CHECKPOINT_PREFIXES", "KOHYA_OFT_FIELDS", "KOHYA_OFT_MODULE", "KOHYA_OFT_PREFIX", "KOHYA_PREFIX", "KOHYA_SINGLE_TE",
    "KOHYA_TRANSFORMER", "MODULE_HEADS", "NATIVE_PREFIX",
    "PEFT_COMPONENT", "PEFT_PREFIX", "PEFT_TRANSFORMER", "PREFIXES", "SIBLING_FIELDS", "SUFFIXES", "UNSUPPORTED_BY_DIM",
    "UNSUPPORTED_SUFFIXES", "WRAPPERS",
    "Prefix", "Suffix", "kohya_name", "kohya_prefix", "peft_prefix",
]

# -- one component <-> prefix table per convention ------------------------------------------------------------
# canonical components: lorakit.model.COMPONENTS ("denoiser" is the UNet or transformer of a pipeline)

#: kohya / A1111 / ComfyUI: one prefix per component, module paths flattened (dots -> underscores)
KOHYA_PREFIX: dict[str, str] = {
    "denoiser": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}
#: a model with a single text encoder (SD 1.x/2.x) writes it without a number, as kohya's sd-scripts do
KOHYA_SINGLE_TE = "lora_te_"
#: kohya sd-scripts' OFT network (``networks.oft``) saves its U-Net layers under its own prefix
KOHYA_OFT_PREFIX = "oft_unet_"
#: OneTrainer's denoiser prefix: ComfyUI reads it as *diffusers* module names, while ``lora_unet_`` means the
#: original (BFL / MMDiT) names; a diffusers-named transformer layer is written under it
KOHYA_TRANSFORMER = "lora_transformer_"
#: diffusers / PEFT: dotted module paths under the pipeline attribute's name
PEFT_PREFIX: dict[str, str] = {
    "denoiser": "unet.",
    "text_encoder": "text_encoder.",
    "text_encoder_2": "text_encoder_2.",
    "text_encoder_3": "text_encoder_3.",
}
#: a transformer-based pipeline's denoiser attribute
PEFT_TRANSFORMER = "transformer."
#: PEFT config / pipeline attribute name -> canonical component
PEFT_COMPONENT: dict[str, str] = {
    "unet": "denoiser", "transformer": "denoiser", "prior": "denoiser",
    "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
}
#: native (ComfyUI / original checkpoint) names
NATIVE_PREFIX: dict[str, tuple[str, ...]] = {
    "denoiser": ("model.diffusion_model.", "diffusion_model."),
    "text_encoder": ("text_encoders.clip_l.transformer.",),
    "text_encoder_2": ("text_encoders.clip_g.transformer.",),
    "text_encoder_3": ("text_encoders.t5xxl.transformer.",),
}
#: heads a module path may still carry inside its component's namespace (tried with and without them)
MODULE_HEADS: dict[str, tuple[str, ...]] = {
    "denoiser": ("unet", "transformer", "model.diffusion_model", "diffusion_model", "model"),
    # transformers 5 flattened CLIPTextModel (no ``text_model.``), while files still carry it
    "text_encoder": ("text_encoder", "te", "te1", "text_model"),
    "text_encoder_2": ("text_encoder_2", "te2", "text_model"),
    "text_encoder_3": ("text_encoder_3", "te3", "text_model"),
}
#: key prefixes of full checkpoints (single files) that are not part of a module's identity
CHECKPOINT_PREFIXES: tuple[str, ...] = (
    *NATIVE_PREFIX["denoiser"], "cond_stage_model.transformer.", "unet.", PEFT_TRANSFORMER, "text_encoder.", "model.",
)


def kohya_prefix(component: str, *, single_te: bool = False, transformer: bool = False) -> str:
    """The kohya prefix lorakit writes for ``component`` (``lora_te_`` for a lone text encoder, OneTrainer's
    ``lora_transformer_`` for diffusers-named transformer layers; unknown components get ``lora_<name>_``)."""
    if component == "text_encoder" and single_te:
        return KOHYA_SINGLE_TE
    if component == "denoiser" and transformer:
        return KOHYA_TRANSFORMER
    return KOHYA_PREFIX.get(component, f"lora_{component}_")


def kohya_name(component: str | None, path: str, *, single_te: bool = False, transformer: bool = False) -> str:
    """``prefix + flattened path``; a path with no component keeps its spelling."""
    if component is None:
        return path
    return kohya_prefix(component, single_te=single_te, transformer=transformer) + path.replace(".", "_")


def peft_prefix(component: str | None, *, transformer: bool = False) -> str:
    """The diffusers/PEFT prefix of ``component`` (``""`` for none; ``transformer.`` for a DiT denoiser)."""
    if component is None:
        return ""
    if component == "denoiser" and transformer:
        return PEFT_TRANSFORMER
    return PEFT_PREFIX.get(component, f"{component}.")


@dataclasses.dataclass(frozen=True)
class Prefix:
    text: str
    component: str | None
    flat: bool
    convention: str


@dataclasses.dataclass(frozen=True)
class Suffix:
    text: str
    field: str
    convention: str


def _read_prefixes() -> tuple[Prefix, ...]:
    """Every prefix the reader knows, from the tables above; longer first so the first match wins."""
    rows = [Prefix(p, c, True, "kohya") for c, p in KOHYA_PREFIX.items()]
    rows.append(Prefix(KOHYA_SINGLE_TE, "text_encoder", True, "kohya"))
    rows.append(Prefix(KOHYA_TRANSFORMER, "denoiser", True, "onetrainer"))
    rows.append(Prefix("lycoris_", "denoiser", True, "lycoris"))
    rows.append(Prefix(KOHYA_OFT_PREFIX, "denoiser", True, "kohya-oft"))
    rows += [Prefix(p, c, False, "native") for c, ps in NATIVE_PREFIX.items() for p in ps]
    rows += [Prefix(p, c, False, "peft") for c, p in PEFT_PREFIX.items()]
    rows.append(Prefix(PEFT_TRANSFORMER, "denoiser", False, "peft"))
    return tuple(sorted(rows, key=lambda p: -len(p.text)))


PREFIXES: tuple[Prefix, ...] = _read_prefixes()

#: wrappers stripped before the prefixes above (PEFT's model wrapper)
WRAPPERS = ("base_model.model.",)

# Longest suffix first so ".lora.down.weight" wins over ".down.weight".
_SUFFIX_ROWS = [
    # kohya / LyCORIS LoCon
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".dora_scale", "dora_scale", "kohya"),
    (".alpha", "alpha", "kohya"),
    # PEFT / diffusers
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_B.default.bias", "up_bias", "peft"),
    (".lora_magnitude_vector.default.weight", "magnitude", "peft"),
    (".lora_magnitude_vector.default", "magnitude", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_B.bias", "up_bias", "peft"),
    (".lora_A", "down", "peft"),  # official Mochi LoRA: no ".weight"
    (".lora_B", "up", "peft"),
    # diffusers text-encoder and "new non-PEFT" spellings
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    # old diffusers attention processor: "...to_k_lora.down.weight"
    ("_lora.down.weight", "down", "diffusers-old"),
    ("_lora.up.weight", "up", "diffusers-old"),
    # XLabs FLUX: "double_blocks.0.processor.qkv_lora1.down.weight"
    (".down.weight", "down", "xlabs"),
    (".up.weight", "up", "xlabs"),
    # LyCORIS LoHa / LoKr / full / norm, LightX2V
    (".hada_w1_a", "hada_w1_a", "lycoris"),
    (".hada_w1_b", "hada_w1_b", "lycoris"),
    (".hada_w2_a", "hada_w2_a", "lycoris"),
    (".hada_w2_b", "hada_w2_b", "lycoris"),
    (".hada_t1", "hada_t1", "lycoris"),
    (".hada_t2", "hada_t2", "lycoris"),
    (".lokr_w1_a", "lokr_w1_a", "lycoris"),
    (".lokr_w1_b", "lokr_w1_b", "lycoris"),
    (".lokr_w2_a", "lokr_w2_a", "lycoris"),
    (".lokr_w2_b", "lokr_w2_b", "lycoris"),
    (".lokr_w1", "lokr_w1", "lycoris"),
    (".lokr_w2", "lokr_w2", "lycoris"),
    (".lokr_t2", "lokr_t2", "lycoris"),
    (".diff_b", "diff_b", "lightx2v"),
    (".diff_m", "diff_m", "lightx2v"),
    (".diff", "diff", "lycoris"),
    (".w_norm", "w_norm", "lycoris"),
    (".b_norm", "b_norm", "lycoris"),
    # LyCORIS diag-OFT (constraint in ".alpha") and (IA)^3 (its vector is a bare ".weight": see SIBLING_FIELDS)
    (".oft_blocks", "oft_blocks", "lycoris"),
    (".rescale", "rescale", "lycoris"),
    (".on_input", "on_input", "lycoris"),
    # LyCORIS GLoRA (its submodules' weights)
    (".a1.weight", "glora_a1", "lycoris"),
    (".a2.weight", "glora_a2", "lycoris"),
    (".b1.weight", "glora_b1", "lycoris"),
    (".b2.weight", "glora_b2", "lycoris"),
    (".bm.weight", "glora_bm", "lycoris"),
]
SUFFIXES: tuple[Suffix, ...] = tuple(
    Suffix(t, f, c) for t, f, c in sorted(_SUFFIX_ROWS, key=lambda r: -len(r[0]))
)

#: a field whose meaning depends on who wrote the file: field -> (field when the file is kohya sd-scripts' own
#: OFT, i.e. under ``KOHYA_OFT_PREFIX`` or with ``ss_network_module`` = ``KOHYA_OFT_MODULE``). sd-scripts and LyCORIS
#: both save ``oft_blocks [k, b, b]`` + ``alpha``, but normalise ``Q`` differently (adapters.oft.kohya_cayley).
KOHYA_OFT_FIELDS: dict[str, str] = {"oft_blocks": "kohya_oft_blocks"}
KOHYA_OFT_MODULE = "networks.oft"

#: suffixes too generic to name a field on their own: suffix -> (sibling suffix, field). The key is that field
#: only when the same module also has the sibling key; otherwise it stays unknown. LyCORIS (IA)^3 saves its
#: vector as ``<module>.weight`` beside the ``<module>.on_input`` flag.
SIBLING_FIELDS: dict[str, tuple[str, str]] = {
    ".weight": (".on_input", "ia3_weight"),
}

#: recognised adapter types lorakit cannot compute yet, told apart from a supported one by the dimension of one
#: tensor: suffix -> (dimension, adapter name). (LyCORIS BOFT's 4-D ``oft_blocks`` used to be listed here; the
#: adapter now tells BOFT from diag-OFT by that dimension itself: ``DiagOFT.from_fields``.)
UNSUPPORTED_BY_DIM: dict[str, tuple[int, str]] = {}

#: recognised adapter types lorakit cannot compute yet: suffix -> adapter name
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".q_layer.weight": "T-LoRA",
    ".p_layer.weight": "T-LoRA",
    ".lambda_layer": "T-LoRA",
    ".set_weight": "ComfyUI set_weight",
    # BFL control LoRAs ship new RMSNorm scales: replacement values, not additive deltas.
    ".query_norm.scale": "BFL control-LoRA norm scale (a replacement value, not a delta)",
    ".key_norm.scale": "BFL control-LoRA norm scale (a replacement value, not a delta)",
    ".reshape_weight": "ComfyUI reshape_weight",
}
