"""Family routing for the offline tools: a LoRA layer whose name is not a checkpoint module (BFL names on a
diffusers checkpoint, diffusers names on a BFL/SGM single file, a fused ``qkv`` against split ``to_q/k/v``)
is resolved through the family's meta-device diffusers model, then onto the checkpoint's own tensors, rows
and row order. No weights are loaded to do so."""

from __future__ import annotations

import dataclasses

from ..families import Target
from ..model import Layer, LoRA
from .common import _CKPT_PREFIXES, Checkpoint, ModuleIndex

__all__ = ["FamilyRouter", "router_for"]


def _compose(first: str | None, second: str | None) -> str | None:
    # the only transform is swap_scale_shift, its own inverse: two swaps cancel
    if first and second:
        return None if first == second else first
    return first or second


@dataclasses.dataclass
class FamilyRouter:
    family: str
    resolver: object  # lorakit.runtime.resolve.Resolver over the meta-device model
    index: ModuleIndex
    reverse: dict[str, list[tuple[str, Target]]]  # diffusers module -> [(original alias, its Target)]

    def route(self, layer: Layer) -> list[Target] | None:
        """Targets on checkpoint modules (``Target.module`` = the checkpoint's module path, ``component`` = the
        checkpoint component or None) or None when the layer has no place in this checkpoint."""
        model_targets = self.resolver.lookup(layer)
        if not model_targets:
            return None
        out: list[Target] = []
        for t in model_targets:
            hit = self._ckpt_module(t.module)
            if hit is not None:
                out.append(dataclasses.replace(t, component=hit[0], module=hit[1]))
                continue
            placed = False
            for alias, ta in self.reverse.get(t.module, ()):
                hit = self._ckpt_module(alias)
                if hit is None:
                    continue
                if t.dst_rows is not None:
                    return None  # a split file layer onto a part of a module that is itself part of a fused tensor
                inverse = {b: a for a, b in ta.param_map}
                param_map = tuple((a, inverse.get(b, b)) for a, b in (t.param_map or ())) or ta.param_map
                out.append(Target(hit[0], hit[1], src_rows=t.src_rows, dst_rows=ta.src_rows,
                                  transform=_compose(t.transform, ta.transform), param_map=param_map))
                placed = True
                break
            if not placed:
                return None
        return out

    def _ckpt_module(self, name: str) -> tuple[str | None, str] | None:
        probe = Layer(name=name, component="denoiser", path=name)
        return self.index.resolve(probe)


def _folder_model(ckpt: Checkpoint):
    """The denoiser of a diffusers folder on the meta device, from its own config.json (exact sizes)."""
    import json

    import torch

    if not ckpt.path.is_dir():
        return None
    for sub in ("transformer", "unet"):
        cfg_path = ckpt.path / sub / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            import diffusers

            cls = getattr(diffusers, str(cfg.get("_class_name")), None)
            if cls is None:
                return None
            with torch.device("meta"):
                return cls.from_config(cfg).eval()
    return None


def router_for(ckpt: Checkpoint, index: ModuleIndex, loras: list[LoRA]) -> FamilyRouter | None:
    """A router for the family of the checkpoint (from its tensor names), else of the LoRAs; None if none."""
    from ..families import detect_family
    from ..families.offline import FAMILY_NAMES, meta_components
    from ..runtime.resolve import Resolver

    modules = []
    for info in ckpt:
        if info.component in (None, "denoiser"):
            name = info.key.rsplit(".", 1)[0]
            # single files prefix the denoiser (``model.diffusion_model.input_blocks...``): detect on the bare names
            modules.append(next((name[len(p):] for p in _CKPT_PREFIXES if name.startswith(p)), name))
    family = detect_family(modules)
    for lora in loras:
        if family is not None:
            break
        family = detect_family(lora)
    if family is None or family not in FAMILY_NAMES:
        return None  # (a diffusers folder whose model no family knows needs no routing: names are its own)
    denoiser = _folder_model(ckpt)
    if denoiser is None:
        denoiser = meta_components(family, ("denoiser",))["denoiser"]
    resolver = Resolver({"denoiser": denoiser})
    generic = set(resolver.index.modules["denoiser"])
    generic |= {name.replace(".", "_") for name in generic}
    reverse: dict[str, list[tuple[str, Target]]] = {}
    for comp, alias in resolver.index.aliases("denoiser"):
        if alias in generic:
            continue
        for t in resolver.index.lookup(comp, alias) or ():
            reverse.setdefault(t.module, []).append((alias, t))
    return FamilyRouter(family, resolver, index, reverse)
