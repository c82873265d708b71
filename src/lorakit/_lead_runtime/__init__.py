"""Apply LoRAs to live models: fused or hooked, stacked, removed bit-exactly."""

from .patch import ApplyReport, Patch, apply
from .resolve import components_of, resolve

__all__ = ["ApplyReport", "Patch", "apply", "components_of", "resolve"]
