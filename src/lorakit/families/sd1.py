"""Stable Diffusion 1.x / 2.x vs SDXL: which UNet a LoRA is for, from its names plus its shapes.

The three share diffusers' ``UNet2DConditionModel`` names and the LDM/SGM names, so the names alone rarely
decide. The rules, first that decides wins:

1. metadata: kohya ``ss_base_model_version`` (``sdxl_*``, ``sd_v1``, ``sd_v2``), ``ss_v2``, ``ss_sdxl``,
   ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/lora``, ``stable-diffusion-v1/lora``...);
2. a second text encoder (``lora_te2_``, ``text_encoder_2``) or a text-encoder width of 1280 -> SDXL; width 1024
   -> SD 2.x;
3. the cross-attention width (``attn2.to_k`` input): 768 SD 1.x, 1024 SD 2.x, 2048 SDXL;
4. the block layout: SD 1.x/2.x have four down blocks with attention in the first (``down_blocks.3``,
   ``down_blocks.0.attentions``, SGM ``input_blocks.1.1``, ``input_blocks.9-11``, ``output_blocks.9-11``); SDXL
   has several transformer blocks per attention (``transformer_blocks.1+``) and ``label_emb`` / ``add_embedding``;
   a 1x1-conv ``proj_in`` is SD 1.x's (SD 2.x and SDXL use a Linear); a text-encoder width of 768 alone is
   SD 1.x's.

A file no rule decides is ``None`` (it could be any of them).
"""

from __future__ import annotations

import re

from .base import Family, register_family

__all__ = ["SD1", "SD2", "unet_kind"]

_UNET = re.compile(
    r"^((down_blocks|up_blocks)[._]\d|mid_block[._]|conv_in$|conv_out$|conv_norm_out$|time_embedding[._]"
    r"|add_embedding[._]|(input_blocks|middle_block|output_blocks|label_emb|time_embed)[._]\d|out[._][02]$)"
)
_SD12_NAMES = re.compile(
    r"^(down_blocks[._]3[._]|down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions"
    r"|input_blocks[._](1|2)[._]1[._]|(input|output)_blocks[._](9|10|11)[._])"
)
_SDXL_NAMES = re.compile(r"(attentions[._]\d+|input_blocks[._]\d+[._]1|output_blocks[._]\d+[._]1|middle_block[._]1)"
                         r"[._]transformer_blocks[._][1-9]|^label_emb|^add_embedding")
_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
_PROJ_IN = re.compile(r"proj_in$")
_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _from_metadata(meta) -> str | None:
    base = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if base.startswith("sdxl") or "stable-diffusion-xl" in arch or str(meta.get("ss_sdxl", "")).lower() == "true":
        return "sdxl"
    if base.startswith("sd_v2") or "stable-diffusion-v2" in arch or str(meta.get("ss_v2", "")).lower() == "true":
        return "sd2"
    if base.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd1"
    return None


def unet_kind(ev) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``None`` for a file whose denoiser layers are UNet layers."""
    paths = list(ev.paths)
    if not paths or sum(bool(_UNET.match(p)) for p in paths) / len(paths) <= 0.5:
        return None
    kind = _from_metadata(ev.metadata)
    if kind:
        return kind
    te = ev.text_widths
    if "text_encoder_2" in te or any(1280 in w for w in te.values()):
        return "sdxl"
    if any(1024 in w for w in te.values()):
        return "sd2"
    widths = {_WIDTH.get(ev.shapes[p][1]) for p in paths if _CROSS_KV.search(p) and p in ev.shapes}
    widths.discard(None)
    if len(widths) == 1:
        return widths.pop()
    if any(_SDXL_NAMES.search(p) for p in paths):
        return "sdxl"
    sd12 = any(_SD12_NAMES.match(p) for p in paths)
    conv_proj = any(len(ev.shapes.get(p, ())) == 4 for p in paths if _PROJ_IN.search(p))
    if conv_proj or (sd12 and any(768 in w for w in te.values())):
        return "sd1"
    return None


class _UNetKind(Family):
    """A detection-only family (its modules' names come from the ``sdxl`` family's UNet aliases)."""

    def evidence(self, evidence) -> float:
        return 1.0 if unet_kind(evidence) == self.name else 0.0


@register_family
class SD1(_UNetKind):
    name = "sd1"


@register_family
class SD2(_UNetKind):
    name = "sd2"
