"""SDXL (and every LDM/SGM UNet): the original ``input_blocks / middle_block / output_blocks`` names (kohya SDXL
``lora_unet_input_blocks_4_1_...``, ComfyUI ``diffusion_model.input_blocks.4.1...``) onto diffusers'
``UNet2DConditionModel``, derived from the model's own structure (``layers_per_block``, int or per block, which
blocks have attentions, down/upsamplers), so SD 1.x/2.x UNets are covered by the same rules.

Numbering: ``input_blocks.0`` is ``conv_in``; then, per down block, one input block per layer (``.0`` resnet,
``.1`` attention when the block has them) and one for its downsampler (``.0.op``). ``middle_block.0/1/2`` are
resnet, attention, resnet. Each up block has ``layers + 1`` output blocks; its upsampler sits on the last of them
at index 2 when the block has attentions, else at index 1 (``output_blocks.N.1.conv``: SD 1.x's first up block).
Inside resnets the SGM names differ (``in_layers.2`` = ``conv1``...); inside attentions (``Transformer2DModel``)
they are the same as diffusers', so every submodule path under the block is aliased as is.
"""

from __future__ import annotations

import re

from torch import nn

from .base import Alias, Family, Target, register_family

__all__ = ["SDXL"]

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
# label_emb is SDXL's added-conditioning MLP (add_embedding), or a class embedding in class-conditioned UNets
_GLOBAL = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
           ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
           ("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2"),
           ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
_FILE = re.compile(r"^(?:(?:input_blocks|middle_block|output_blocks|label_emb|time_embed)[._]\d|out[._][02]$)")


def _per_block(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def _attentions(block: nn.Module) -> list:
    return [a for a in (getattr(block, "attentions", None) or []) if a is not None]


@register_family
class SDXL(Family):
    name = "sdxl"

    model_class = "UNet2DConditionModel"
    # SGM paths only: a kohya file in diffusers names (``lora_unet_down_blocks_...``, as diffusers'
    # convert_state_dict_to_kohya writes SDXL LoRAs) looks like an SD 1.x file and is not detected as SDXL
    file_pattern = _FILE

    def evidence(self, evidence) -> float:
        """SD 1.x / 2.x and SDXL share the UNet names: names plus shapes and metadata decide (``sd1.unet_kind``)."""
        from .sd1 import unet_kind

        return 1.0 if unet_kind(evidence) == "sdxl" else 0.0

    def module_map(self, module: nn.Module) -> list[tuple[str, str, str]]:
        """``(original prefix, diffusers prefix, kind)`` for every block of the UNet that exists; kind is
        ``resnet``, ``attention``, ``sampler`` or ``plain``."""
        mods = dict(module.named_modules())
        down, up = list(module.down_blocks), list(module.up_blocks)
        layers = _per_block(module.config.layers_per_block, len(down))
        out: list[tuple[str, str, str]] = [(orig, diff, "plain") for orig, diff in _GLOBAL]
        n = 1
        for i, block in enumerate(down):
            attentions = _attentions(block)
            for j in range(layers[i]):
                out.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
                if j < len(attentions):
                    out.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", "attention"))
                n += 1
            if getattr(block, "downsamplers", None):
                out.append((f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "sampler"))
                n += 1
        mid = getattr(module, "mid_block", None)
        if mid is not None:
            out.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
            if _attentions(mid):
                out.append(("middle_block.1", "mid_block.attentions.0", "attention"))
                out.append(("middle_block.2", "mid_block.resnets.1", "resnet"))
            else:
                out.append(("middle_block.1", "mid_block.resnets.1", "resnet"))
        m = 0
        for i, block in enumerate(up):
            attentions = _attentions(block)
            for j in range(len(block.resnets)):
                out.append((f"output_blocks.{m}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
                if j < len(attentions):
                    out.append((f"output_blocks.{m}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
                if j == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                    # the upsampler follows the attention when the block has one: index 2, else 1
                    out.append((f"output_blocks.{m}.{2 if attentions else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv",
                                "sampler"))
                m += 1
        return [(orig, diff, kind) for orig, diff, kind in out if diff in mods]

    def aliases(self, component: str, module: nn.Module):
        mods = dict(module.named_modules())
        for orig, diff, kind in self.module_map(module):
            yield Alias(orig, Target(component, diff))
            if kind == "resnet":
                for o, d in _RESNET:
                    if f"{diff}.{d}" in mods:
                        yield Alias(f"{orig}.{o}", Target(component, f"{diff}.{d}"))
            elif kind == "attention":
                # inside a Transformer2DModel the names are the same in both namespaces
                for name in mods:
                    if name.startswith(diff + "."):
                        yield Alias(orig + name[len(diff):], Target(component, name))
