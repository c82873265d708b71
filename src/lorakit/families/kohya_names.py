"""The names kohya's trainers write, per family: the inverse of the families' alias tables.

kohya sd-scripts and musubi-tuner name a layer by the family's *original* module path, flattened
(``lora_unet_double_blocks_0_img_attn_qkv`` for FLUX.1, ``lora_unet_input_blocks_4_1_...`` for SDXL,
``lora_unet_blocks_0_self_attn_q`` for Wan), and fuse the projections the original model fuses (FLUX.1's
``img_attn.qkv`` and ``linear1``, SD3's ``attn.qkv``). Diffusers' loaders for those families convert only these
names. A family whose kohya names are diffusers' own (SD 1.x / 2.x: sd-scripts names the diffusers UNet) is
written with the diffusers path, flattened.

Nothing here is a second name table: :class:`KohyaNames` walks the family's own :meth:`Family.aliases` (the table
the reader resolves with) and keeps, per diffusers module, the first alias whose flattened spelling resolves back
to exactly that alias's targets, so what is written is what lorakit and the peers read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from .base import FAMILIES, Alias, Family, Target, build_index

__all__ = ["DIFFUSERS_NAMED", "KohyaNames", "KohyaSlot"]

#: families whose kohya trainer names the diffusers modules themselves (sd-scripts' SD 1.x / 2.x LoRAs name the
#: diffusers UNet, ``lora_unet_down_blocks_0_attentions_0_...``); every other family with aliases writes them
DIFFUSERS_NAMED = frozenset({"sd1", "sd15", "sd2"})


@dataclasses.dataclass(frozen=True)
class KohyaSlot:
    """One kohya layer: ``name`` is the family's original module path (dotted; the writer flattens it) and
    ``parts`` the diffusers modules it covers, in the row order of the original (fused) weight. ``part`` is which
    of them a given diffusers module is."""

    component: str
    name: str
    parts: tuple[Target, ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    def part(self, module: str) -> Target:
        return next(t for t in self.parts if t.module == module)


def _key(targets: list[Target]) -> tuple:
    return tuple((t.component, t.module, t.src_rows, t.dst_rows, t.transform, t.param_map) for t in targets)


class KohyaNames:
    """``(component, diffusers module) -> KohyaSlot`` for one model (live or meta-device components).

    ``family``: the family the file is written for; ``None`` or one of :data:`DIFFUSERS_NAMED` keeps diffusers
    names for every module. Only the denoiser is renamed: kohya names text encoders by their transformers paths.
    """

    def __init__(self, components: Mapping[str, nn.Module], family: str | None) -> None:
        self.family = family
        self.slots: dict[tuple[str, str], KohyaSlot] = {}
        root = components.get("denoiser")
        if family is None or family in DIFFUSERS_NAMED or root is None:
            return
        index = build_index({"denoiser": root})
        for fam in self._families(root):
            for item in fam.aliases("denoiser", root):
                self._add(Alias.of(item), index)

    @staticmethod
    def _families(root: nn.Module) -> list[Family]:
        return [f for f in FAMILIES if f.matches_model("denoiser", root)]

    def _add(self, alias: Alias, index) -> None:
        targets = list(alias.targets)
        if not targets or any(t.dst_rows is not None for t in targets):
            return
        flat = alias.name.replace(".", "_")
        # the name must read back to this very alias: a generic module name that wins over it is not this alias
        if _key(index.lookup("denoiser", flat) or []) != _key(targets):
            return
        if any(t.module == alias.name and not t.param_map for t in targets):
            return  # the alias is the module's own name: nothing to rename
        if any(("denoiser", t.module) in self.slots for t in targets):
            return  # an earlier alias (the family's first spelling) already names one of these modules
        slot = KohyaSlot("denoiser", alias.name, tuple(targets))
        for t in targets:
            self.slots[("denoiser", t.module)] = slot

    def slot(self, component: str, module: str) -> KohyaSlot | None:
        """The original layer that covers ``module`` (``None``: keep the diffusers name)."""
        return self.slots.get((component, module))

    def __len__(self) -> int:
        return len(self.slots)
