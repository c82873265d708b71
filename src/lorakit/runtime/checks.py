"""Checks an apply makes on the target before planning anything."""

from __future__ import annotations

from torch import nn

from ..errors import MetaDeviceError

__all__ = ["refuse_meta"]


def refuse_meta(components: dict[str, nn.Module], target: object) -> None:
    """Raise :class:`MetaDeviceError` when a component holds ``meta`` tensors (no weights to patch)."""
    for comp, root in components.items():
        for name, p in root.named_parameters():
            if p.device.type == "meta":
                raise MetaDeviceError(
                    f"the {type(target).__name__} ({comp}) is on the meta device ({name} has no data): a LoRA "
                    "can only be applied to real weights. To check which layers a file would match without "
                    "weights, run `lorakit inspect FILE --model FAMILY` (or lorakit.inspect(file, model=...)); "
                    "to apply, load the model's weights first."
                )
