"""Checks an apply makes on the target before planning anything."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import MetaDeviceError

__all__ = ["refuse_meta"]


def refuse_meta(components: dict[str, nn.Module], target: object,
                modules: Mapping[str, Mapping[str, nn.Module]] | None = None) -> None:
    """Raise :class:`MetaDeviceError` when a component holds ``meta`` tensors (no weights to patch). ``modules``:
    each component's ``named_modules()`` when the caller has them (one traversal less)."""
    for comp, root in components.items():
        mods = modules[comp] if modules is not None else dict(root.named_modules())
        params = ((f"{m_name}.{p_name}".lstrip("."), p) for m_name, m in mods.items()
                  for p_name, p in m._parameters.items() if p is not None)
        for name, p in params:
            if p.device.type == "meta":
                raise MetaDeviceError(
                    f"the {type(target).__name__} ({comp}) is on the meta device ({name} has no data): a LoRA "
                    "can only be applied to real weights. To check which layers a file would match without "
                    "weights, run `lorakit inspect FILE --model FAMILY` (or lorakit.inspect(file, model=...)); "
                    "to apply, load the model's weights first."
                )
