"""Krea 2 (``krea-ai/krea-2``): its own single-stream MMDiT (diffusers' ``Krea2Transformer2DModel``), not a FLUX.1
fine-tune. The original / ComfyUI / reference-trainer names (``diffusion_model.blocks.0.attn.wq``), kohya's
flattened ones (``lora_unet_blocks_0_attn_wq``), ai-toolkit's ``base_model.model.`` ones and diffusers / PEFT names
land on diffusers' modules:

- ``blocks.N`` -> ``transformer_blocks.N``; ``attn.wq/wk/wv/wo/gate`` -> ``attn.to_q/to_k/to_v/to_out.0/to_gate``;
  ``attn.qknorm.qnorm/knorm`` -> ``attn.norm_q/norm_k``; ``mlp.gate/up/down`` -> ``ff.gate/up/down``;
  ``prenorm/postnorm`` -> ``norm1/norm2``;
- the text fusion (``txtfusion.layerwise_blocks.N`` / ``refiner_blocks.N`` / ``projector``) -> ``text_fusion.…``
  with the same block renames;
- ``first`` -> ``img_in``; ``tmlp.0/2`` -> ``time_embed.linear_1/2``; ``tproj.1`` -> ``time_mod_proj``;
  ``txtmlp.0/1/3`` -> ``txt_in.norm/linear_1/linear_2``; ``last.linear`` / ``last.norm`` -> ``final_layer.…``.

There is no fused projection (queries and the grouped key/value heads are separate layers) and no modulation
layer changes its row order: the shared ``tproj.1`` keeps its six chunks, the per-block and final modulations are
learned tables (parameters ``mod.lin`` / ``last.modulation.lin``, diffusers ``scale_shift_table``), which no LoRA
format addresses as layers. The renames follow diffusers' single-file converter
``convert_krea2_transformer_checkpoint_to_diffusers``; block counts come from the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["Krea2"]

# (original suffix inside a block, diffusers module inside the block): transformer and text-fusion blocks alike
_BLOCK = (
    ("attn.wq", "attn.to_q"), ("attn.wk", "attn.to_k"), ("attn.wv", "attn.to_v"), ("attn.wo", "attn.to_out.0"),
    ("attn.gate", "attn.to_gate"), ("attn.qknorm.qnorm", "attn.norm_q"), ("attn.qknorm.knorm", "attn.norm_k"),
    ("mlp.gate", "ff.gate"), ("mlp.up", "ff.up"), ("mlp.down", "ff.down"), ("prenorm", "norm1"), ("postnorm", "norm2"),
)
_GLOBAL = (
    ("first", "img_in"), ("tmlp.0", "time_embed.linear_1"), ("tmlp.2", "time_embed.linear_2"),
    ("tproj.1", "time_mod_proj"), ("txtmlp.0", "txt_in.norm"), ("txtmlp.1", "txt_in.linear_1"),
    ("txtmlp.3", "txt_in.linear_2"), ("txtfusion.projector", "text_fusion.projector"),
    ("last.linear", "final_layer.linear"), ("last.norm", "final_layer.norm"),
)
_INNER = (r"attn[._](wq|wk|wv|wo|gate|qknorm[._][qk]norm|to_[qkv]|to_out[._]0|to_gate|norm_[qk])"
          r"|mlp[._](gate|up|down)|ff[._](gate|up|down)|prenorm|postnorm|norm[12]")
_FILE = re.compile(
    r"^((blocks|transformer_blocks|(txtfusion|text_fusion)[._](layerwise|refiner)_blocks)[._]\d+([._](" + _INNER + r"))?"
    r"|first|img_in|tmlp[._][02]|time_embed[._]linear_[12]|tproj[._]1|time_mod_proj|txtmlp[._][013]"
    r"|txt_in[._](norm|linear_[12])|(txtfusion|text_fusion)[._]projector|(last|final_layer)[._](linear|norm))$"
)
# names only Krea 2 has, in either spelling
_MARKER = re.compile(
    r"(^|[._])(txtfusion|text_fusion|tmlp|tproj|txtmlp|time_mod_proj)([._]|$)"
    r"|^blocks[._]\d+[._](attn[._](wq|wk|wv|wo|gate|qknorm)|mlp[._](gate|up|down))"
    r"|^transformer_blocks[._]\d+[._](attn[._]to_gate|ff[._](gate|up|down))$|^(first|last[._]linear)$"
)


@register_family
class Krea2(Family):
    name = "krea2"

    model_class = "Krea2Transformer2DModel"
    file_pattern = _FILE

    def matches_file(self, paths: Iterable[str]) -> float:
        """The share of Krea 2 names, when a name only Krea 2 has is among them (diffusers' ``transformer_blocks.N.
        attn.to_q`` alone is every DiT's)."""
        paths = list(paths)
        if not any(_MARKER.search(p) for p in paths):
            return 0.0
        return super().matches_file(paths)

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        stacks = [("blocks", "transformer_blocks")]
        stacks += [(f"txtfusion.{s}", f"text_fusion.{s}") for s in ("layerwise_blocks", "refiner_blocks")]
        for orig_stack, stack in stacks:
            i = 0
            while f"{stack}.{i}" in mods:
                for orig, diff in _BLOCK:
                    if f"{stack}.{i}.{diff}" in mods:
                        yield Alias(f"{orig_stack}.{i}.{orig}", Target(component, f"{stack}.{i}.{diff}"))
                i += 1
        for orig, diff in _GLOBAL:
            if diff in mods:
                yield Alias(orig, Target(component, diff))
