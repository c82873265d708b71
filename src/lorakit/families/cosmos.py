"""Cosmos (NVIDIA): Predict2 / 2.0 native names (``blocks.0.self_attn.q_proj``, ``mlp.layer1``,
``adaln_modulation_self_attn.1``) and Cosmos 1.0 names (``blocks.block0.blocks.0.block.attn.to_q.0``), with or
without the checkpoint's ``net.`` prefix, onto diffusers' ``CosmosTransformer3DModel``. Pure renames: no
fused projection, same row order (diffusers' own single-file conversion is a rename table too).
"""

from __future__ import annotations

import re

from torch import nn

from .base import Family, Target, register_family

__all__ = ["Cosmos"]

# Cosmos 2.0 / Predict2: (native name inside blocks.N, diffusers module inside transformer_blocks.N)
_BLOCK_2 = (
    *((f"{attn}.{a}", f"{diff}.{b}") for attn, diff in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"),
                   ("q_norm", "norm_q"), ("k_norm", "norm_k"))),
    ("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2"),
    *((f"adaln_modulation_{name}.{i}", f"norm{n}.linear_{i}") for n, name in
      ((1, "self_attn"), (2, "cross_attn"), (3, "mlp")) for i in (1, 2)),
)
# Cosmos 1.0: blocks.blockN.blocks.{0: self-attention, 1: cross-attention, 2: MLP}
_BLOCK_1 = (
    *((f"blocks.{k}.block.attn.{a}", f"{diff}.{b}") for k, diff in ((0, "attn1"), (1, "attn2"))
      for a, b in (("to_q.0", "to_q"), ("to_q.1", "norm_q"), ("to_k.0", "to_k"), ("to_k.1", "norm_k"),
                   ("to_v.0", "to_v"), ("to_out.0", "to_out.0"))),
    ("blocks.2.block.layer1", "ff.net.0.proj"), ("blocks.2.block.layer2", "ff.net.2"),
    *((f"blocks.{k}.adaLN_modulation.{i}", f"norm{k + 1}.linear_{i}") for k in range(3) for i in (1, 2)),
)
_GLOBAL = (
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
    ("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"),
    ("t_embedding_norm", "time_embed.norm"),
    ("affline_norm", "time_embed.norm"),  # (sic) Cosmos 1.0
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaLN_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_FILE = re.compile(
    r"^(net[._])?(blocks[._]\d+[._](self_attn|cross_attn)[._](q_proj|k_proj|v_proj|output_proj|q_norm|k_norm)"
    r"|blocks[._]\d+[._](mlp[._]layer[12]|adaln_modulation_)|blocks[._]block\d+[._]blocks[._][012]"
    r"|x_embedder[._]proj[._]1|t_embedder[._]1|t_embedding_norm|final_layer[._]adaln_modulation)"
)


@register_family
class Cosmos(Family):
    name = "cosmos"

    model_class = "CosmosTransformer3DModel"
    file_pattern = _FILE

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        pairs: list[tuple[str, str]] = []
        for i in range(len(getattr(module, "transformer_blocks", []))):
            block = f"transformer_blocks.{i}"
            pairs += [(f"blocks.{i}.{orig}", f"{block}.{diff}") for orig, diff in _BLOCK_2]
            pairs += [(f"blocks.block{i}.{orig}", f"{block}.{diff}") for orig, diff in _BLOCK_1]
        pairs += list(_GLOBAL)
        for orig, diff in pairs:
            if diff in mods:
                target = Target(component, diff)
                yield orig, target
                yield f"net.{orig}", target  # native checkpoints keep the ``net.`` of NVIDIA's training wrapper
