"""Naming conventions as data: file prefixes (-> component, flattened or dotted namespace) and adapter
suffixes (-> canonical field). Detection and grouping are generic code over these tables.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PREFIXES", "SUFFIXES", "UNSUPPORTED_SUFFIXES", "Prefix", "Suffix"]


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


# Longest first within each family of prefixes; the first match wins.
PREFIXES: tuple[Prefix, ...] = (
    Prefix("lora_unet_", "denoiser", True, "kohya"),
    Prefix("lora_te1_", "text_encoder", True, "kohya"),
    Prefix("lora_te2_", "text_encoder_2", True, "kohya"),
    Prefix("lora_te3_", "text_encoder_3", True, "kohya"),
    Prefix("lora_te_", "text_encoder", True, "kohya"),
    Prefix("lora_transformer_", "denoiser", True, "onetrainer"),
    Prefix("lycoris_", "denoiser", True, "lycoris"),
    Prefix("model.diffusion_model.", "denoiser", False, "native"),
    Prefix("diffusion_model.", "denoiser", False, "native"),
    Prefix("text_encoders.clip_l.transformer.", "text_encoder", False, "native"),
    Prefix("text_encoders.clip_g.transformer.", "text_encoder_2", False, "native"),
    Prefix("text_encoders.t5xxl.transformer.", "text_encoder_3", False, "native"),
    Prefix("unet.", "denoiser", False, "peft"),
    Prefix("transformer.", "denoiser", False, "peft"),
    Prefix("text_encoder_2.", "text_encoder_2", False, "peft"),
    Prefix("text_encoder_3.", "text_encoder_3", False, "peft"),
    Prefix("text_encoder.", "text_encoder", False, "peft"),
)

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
]
SUFFIXES: tuple[Suffix, ...] = tuple(
    Suffix(t, f, c) for t, f, c in sorted(_SUFFIX_ROWS, key=lambda r: -len(r[0]))
)

#: recognised adapter types lorakit cannot compute yet: suffix -> adapter name
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".oft_blocks": "OFT/BOFT",
    ".rescale": "OFT/BOFT",
    ".on_input": "(IA)^3",
    ".a1.weight": "GLoRA",
    ".a2.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".b2.weight": "GLoRA",
    ".bm.weight": "GLoRA",
    ".q_layer.weight": "T-LoRA",
    ".p_layer.weight": "T-LoRA",
    ".lambda_layer": "T-LoRA",
    ".set_weight": "ComfyUI set_weight",
    # BFL control LoRAs ship new RMSNorm scales: replacement values, not additive deltas.
    ".query_norm.scale": "BFL control-LoRA norm scale (a replacement value, not a delta)",
    ".key_norm.scale": "BFL control-LoRA norm scale (a replacement value, not a delta)",
    ".reshape_weight": "ComfyUI reshape_weight",
}
