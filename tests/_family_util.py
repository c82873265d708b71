"""Shared by the family tests: invert a family's alias map into an original-named checkpoint, so diffusers'
own single-file converters can check the map (a wrong name, row split or scale/shift order shows up as a
tensor that does not come back)."""

from __future__ import annotations

import torch

from lorakit.families import FAMILIES, Target


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights start at ones, tables at zero: a mix-up would go unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def original_checkpoint(model: torch.nn.Module, family_name: str, component: str = "denoiser") -> dict[str, torch.Tensor]:
    """``{original name: tensor}`` whose conversion to diffusers should give ``model``'s state dict: each family
    alias's weight/bias rebuilt from its targets (rows concatenated in ``src_rows`` order, row transform undone)."""
    family = next(f for f in FAMILIES if f.name == family_name)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for alias, targets, *_ in family.aliases(component, model):
        targets = [targets] if isinstance(targets, Target) else list(targets)
        for p in ("weight", "bias"):
            parts = []
            for t in sorted(targets, key=lambda t: (t.src_rows or (0, 0))[0]):
                key = f"{t.module}.{p}" if t.module else p
                if key not in sd:
                    break
                w = sd[key]
                if t.transform == "swap_scale_shift":
                    half = w.shape[0] // 2
                    w = torch.cat([w[half:], w[:half]])
                parts.append(w)
            else:
                if parts:
                    out.setdefault(f"{alias}.{p}", torch.cat(parts))
    return out
