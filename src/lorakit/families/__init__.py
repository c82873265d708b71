"""Model families: extra names for the modules of FLUX.1 and other models (see base.py).

Importing this package registers the built-in families.
"""

from collections.abc import Iterable

from . import flux as _flux  # noqa: F401  (registers the family)
from .base import FAMILIES, Family, NameIndex, Target, build_index, register_family

__all__ = ["FAMILIES", "Family", "NameIndex", "Target", "build_index", "detect_family", "register_family"]


def detect_family(lora_or_paths: object) -> str | None:
    """The registered family whose file patterns fit best (score > 0.5), or ``None``."""
    paths: Iterable[str]
    layers = getattr(lora_or_paths, "layers", None)
    paths = [layer.path for layer in layers.values()] if layers is not None else list(lora_or_paths)  # type: ignore[arg-type]
    best, score = None, 0.5
    for family in FAMILIES:
        s = family.matches_file(paths)
        if s > score:
            best, score = family.name, s
    return best
