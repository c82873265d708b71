"""Apply LoRAs to live models: fused (bit-exact removal) or hooked (live strengths), stacked and removed
newest first. ``apply`` resolves names through :mod:`lorakit.families`.
"""

from ..families.resolve import GENERIC, Resolver, components_of
from .patch import ApplyReport, Patch, PatchOrderError, apply

__all__ = ["GENERIC", "ApplyReport", "Patch", "PatchOrderError", "Resolver", "apply", "components_of"]
