"""LTX-Video (0.9.x): the original / ComfyUI names (``diffusion_model.transformer_blocks.0.attn1.to_q``,
``diffusion_model.patchify_proj``, ``adaln_single.linear``) and their kohya-flattened form onto diffusers'
``LTXVideoTransformer3DModel``.

The original layout is diffusers' own apart from a few renames (diffusers'
``convert_ltx_transformer_checkpoint_to_diffusers``): ``patchify_proj`` -> ``proj_in``, ``adaln_single`` ->
``time_embed``, ``attnN.q_norm/k_norm`` -> ``attnN.norm_q/norm_k``. There is no fused projection; the
per-block and global ``scale_shift_table`` parameters have the same name and row order in both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["VIDEO_FILE", "LTXVideo", "renamed_aliases"]

#: original top-level module -> diffusers module
RENAMES = (("patchify_proj", "proj_in"), ("adaln_single", "time_embed"))
_NORMS = ((".q_norm", ".norm_q"), (".k_norm", ".norm_k"))


def renamed_aliases(component: str, module: nn.Module, renames: Iterable[tuple[str, str]]):
    """An alias ``orig + rest`` for every module ``diff + rest`` of ``module`` (``renames`` of top-level
    modules), and ``...q_norm/k_norm`` for every attention's ``norm_q/norm_k``."""
    renames = tuple(renames)
    for name in dict(module.named_modules()):
        for orig, diff in renames:
            if name == diff or name.startswith(diff + "."):
                yield Alias(orig + name[len(diff):], Target(component, name))
        for orig, diff in _NORMS:
            if name.endswith(diff):
                yield Alias(name[: -len(diff)] + orig, Target(component, name))


# the family's names: diffusers and original, dotted or flattened
VIDEO_FILE = re.compile(
    r"^(transformer_blocks[._]\d+[._](attn[12][._](to_[qkv]|to_out[._]0|norm_[qk]|[qk]_norm)|ff[._]net[._](0[._]proj|2)"
    r"|scale_shift_table)|proj_in|proj_out|patchify_proj|(adaln_single|time_embed)[._](linear|emb[._]timestep_embedder"
    r"[._]linear_[12])|caption_projection[._]linear_[12]|scale_shift_table)$"
)


@register_family
class LTXVideo(Family):
    name = "ltx-video"

    model_class = "LTXVideoTransformer3DModel"
    file_pattern = VIDEO_FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        paths = list(paths)
        from .ltx2 import OWN  # an audio / audio-video layer is LTX-2's

        return 0.0 if any(OWN.search(p) for p in paths) else super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        yield from renamed_aliases(component, module, RENAMES)
