"""Apply LoRAs to live models: fused (bit-exact removal) or hooked (live strengths), stacked and removed
newest first. ``apply`` resolves names through :mod:`lorakit.families`.
"""

from .patch import ApplyReport, Patch, PatchOrderError, apply
from ..families.resolve import GENERIC, Resolver, components_of

__all__ = ["GENERIC", "ApplyReport", "Patch", "PatchOrderError", "Resolver", "apply", "components_of"]
