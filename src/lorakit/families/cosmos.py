"""Cosmos (NVIDIA): Predict2 / 2.5 native names (``blocks.0.self_attn.q_proj``, ``mlp.layer1``,
``adaln_modulation_self_attn.1``; NVIDIA's cosmos-predict2 trainer, ComfyUI, Anima trainers) and Cosmos 1.0 names
(``blocks.block0.blocks.0.block.attn.to_q.0``), with or without the checkpoint's ``net.`` prefix, onto diffusers'
``CosmosTransformer3DModel``.

Pure renames, checked against diffusers' single-file converter: no fused projection, and the adaLN layers keep
their row order (native and diffusers both split ``final_layer.adaln_modulation`` as (shift, scale) and the block
modulations as (shift, scale, gate)). Block counts come from the model.
"""

from __future__ import annotations

import re

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["Cosmos"]

_QKV = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"),
        ("q_norm", "norm_q"), ("k_norm", "norm_k"))
# Cosmos 2.0 / Predict2 / 2.5: (native name inside blocks.N, diffusers module inside transformer_blocks.N)
_BLOCK_2 = (
    *((f"{attn}.{a}", f"{diff}.{b}") for attn, diff in (("self_attn", "attn1"), ("cross_attn", "attn2")) for a, b in _QKV),
    # Predict2.5 image context (Transfer2.5): the same names on both sides
    *((f"cross_attn.{n}", f"attn2.{n}") for n in ("q_img", "k_img", "v_img", "q_img_norm", "k_img_norm")),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    *((f"adaln_modulation_{name}.{i}", f"norm{n}.linear_{i}")
      for n, name in ((1, "self_attn"), (2, "cross_attn"), (3, "mlp")) for i in (1, 2)),
)
_TO = (("to_q.0", "to_q"), ("to_q.1", "norm_q"), ("to_k.0", "to_k"), ("to_k.1", "norm_k"), ("to_v.0", "to_v"),
       ("to_out.0", "to_out.0"))
# Cosmos 1.0: blocks.blockN.blocks.{0: self-attention, 1: cross-attention, 2: MLP}
_BLOCK_1 = (
    *((f"blocks.{k}.block.attn.{a}", f"{diff}.{b}") for k, diff in ((0, "attn1"), (1, "attn2")) for a, b in _TO),
    ("blocks.2.block.layer1", "ff.net.0.proj"),
    ("blocks.2.block.layer2", "ff.net.2"),
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
    ("final_layer.adaLN_modulation.1", "norm_out.linear_1"),  # Cosmos 1.0
    ("final_layer.adaLN_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
    # Predict2.5 text / image context projections: same names, listed so the ``net.`` spelling resolves too
    ("crossattn_proj.0", "crossattn_proj.0"),
    ("img_context_proj.0", "img_context_proj.0"),
)
# Cosmos' own names, dotted or flattened; Wan's ``self_attn.q`` / ``ffn.0`` / ``cross_attn.k_img`` and FLUX/SD3's
# ``adaLN_modulation`` do not match. Anima (a Predict2 fine-tune) adds ``llm_adapter``.
_FILE = re.compile(
    r"^(net[._])?(blocks[._]\d+[._](self_attn|cross_attn)[._](q_proj|k_proj|v_proj|output_proj|q_norm|k_norm)"
    r"|blocks[._]\d+[._](mlp[._]layer[12]|adaln_modulation_)|blocks[._]block\d+[._]blocks[._][012]"
    r"|blocks[._]\d+[._]cross_attn[._](q_img|q_img_norm|k_img_norm)|crossattn_proj[._]0|img_context_proj[._]0"
    r"|x_embedder[._]proj[._]1|t_embedder[._]1|t_embedding_norm|final_layer[._]adaln_modulation|llm_adapter[._])"
)
_BLOCK_INDEX = re.compile(r"^(?:net[._])?blocks[._](?:block)?(\d+)[._]")
_LLM_ADAPTER = re.compile(r"^(?:net[._])?llm_adapter[._]")


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
                yield Alias(orig, target)
                yield Alias(f"net.{orig}", target)  # native checkpoints keep the ``net.`` of NVIDIA's training wrapper

    def notes(self, component: str, module: nn.Module, touched: set[str], paths: list[str]) -> list[str]:
        out = []
        blocks = len(getattr(module, "transformer_blocks", []))
        indices = {int(m.group(1)) for p in paths if (m := _BLOCK_INDEX.match(p))}
        if indices and max(indices) >= blocks:
            out.append(f"the LoRA has blocks up to {max(indices)}, the model {blocks} (0..{blocks - 1}): a LoRA for a "
                       "larger Cosmos model (Predict2 2B has 28 blocks, 14B 36)? The extra blocks get no delta")
        adapter = sum(bool(_LLM_ADAPTER.match(p)) for p in paths)
        if adapter:
            out.append(f"{adapter} layer(s) of Anima's llm_adapter: diffusers keeps it outside the transformer (the "
                       "pipeline's text_conditioner), so they are not applied to the CosmosTransformer3DModel")
        return out
