"""Model families: extra names for the modules of SDXL, SD3, FLUX.1, Wan, Cosmos, ... (see base.py)."""

from .base import FAMILIES, Family, NameIndex, Target, build_index, register_family

__all__ = ["FAMILIES", "Family", "NameIndex", "Target", "build_index", "register_family"]
