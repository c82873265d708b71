"""LTX-2 (2.0 / 2.3 / 2.5, audio + video): the original / ComfyUI names (``diffusion_model.patchify_proj``,
``adaln_single``, ``av_ca_a2v_gate_adaln_single``, ``prompt_adaln_single``...) and their kohya-flattened form onto
diffusers' ``LTX2VideoTransformer3DModel``.

The renames are those of diffusers' ``convert_ltx2_transformer_to_diffusers`` and
``_convert_non_diffusers_ltx2_lora_to_diffusers`` (LTX-2.3 adds ``prompt_adaln_single`` /
``audio_prompt_adaln_single``). There is no fused projection and no scale/shift swap: the modulation heads keep
their row order. Inside blocks the names are diffusers' own (``attn1``, ``audio_attn1``,
``audio_to_video_attn``, ``to_gate_logits``), apart from ``q_norm/k_norm`` -> ``norm_q/norm_k``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Family, register_family
from .ltx_video import VIDEO_FILE, renamed_aliases

__all__ = ["LTX2", "OWN"]

#: original top-level module -> diffusers module
RENAMES = (
    ("patchify_proj", "proj_in"), ("audio_patchify_proj", "audio_proj_in"),
    ("adaln_single", "time_embed"), ("audio_adaln_single", "audio_time_embed"),
    ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
    ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
    ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
    ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
    ("prompt_adaln_single", "prompt_adaln"), ("audio_prompt_adaln_single", "audio_prompt_adaln"),
)
# names only LTX-2 has (audio stream, audio-video cross attention, gates, prompt modulation)
OWN = re.compile(
    r"(^|[._])(audio_(attn[12]|ff|proj_in|proj_out|patchify_proj|adaln_single|time_embed|prompt_adaln(_single)?"
    r"|to_video_attn)|video_to_audio_attn|av_ca_|av_cross_attn_|to_gate_logits|prompt_adaln)([._]|$)"
)
_ANY = re.compile(
    r"^(transformer_blocks[._]\d+[._]|(audio_)?(proj_in|proj_out|patchify_proj|adaln_single|time_embed|prompt_adaln"
    r"|prompt_adaln_single|caption_projection)([._]|$)|av_c)"
)


@register_family
class LTX2(Family):
    name = "ltx2"

    model_class = "LTX2VideoTransformer3DModel"

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of paths in LTX's namespace; a video-only LoRA in diffusers names is LTX-Video's too, and
        is told apart by its widths (:mod:`lorakit.families.detect`)."""
        paths = list(paths)
        if not paths:
            return 0.0
        share = sum(bool(_ANY.match(p)) for p in paths) / len(paths)
        return share if any(OWN.search(p) for p in paths) else min(share, _video_share(paths))

    def aliases(self, component: str, module: nn.Module):
        yield from renamed_aliases(component, module, RENAMES)


def _video_share(paths: list[str]) -> float:
    # a video-only file scores as LTX-Video does: the two tie, and the widths decide
    return sum(bool(VIDEO_FILE.match(p)) for p in paths) / len(paths)
