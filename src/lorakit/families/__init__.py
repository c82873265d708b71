"""Model families and name resolution: extra names for the modules of SDXL, SD3, FLUX.1, Wan and Cosmos
(``base.py``, one module per family) and the one :class:`Resolver` (``resolve.py``) that places LoRA layers on
live modules, meta-device modules or checkpoint keys. Importing this package registers the built-in families.
"""

from collections.abc import Iterable

# importing each module registers its family
from . import clip as _clip  # noqa: F401
from . import cosmos as _cosmos  # noqa: F401
from . import flux as _flux  # noqa: F401
from . import flux2 as _flux2  # noqa: F401
from . import qwen_image as _qwen_image  # noqa: F401
from . import sd3 as _sd3  # noqa: F401
from . import sdxl as _sdxl  # noqa: F401
from . import wan as _wan  # noqa: F401
from . import z_image as _z_image  # noqa: F401
from .base import (
    FAMILIES,
    Alias,
    Family,
    ModuleRef,
    NameIndex,
    RowTransform,
    Target,
    build_index,
    register_family,
)
from .resolve import GENERIC, CheckpointNames, Resolution, Resolver, Router, checkpoint_router, components_of

__all__ = [
    "FAMILIES",
    "GENERIC",
    "Alias",
    "CheckpointNames",
    "Family",
    "ModuleRef",
    "NameIndex",
    "Resolution",
    "Resolver",
    "Router",
    "RowTransform",
    "Target",
    "build_index",
    "checkpoint_router",
    "components_of",
    "detect_family",
    "register_family",
]


def detect_family(lora_or_paths: object) -> str | None:
    """The registered family whose file patterns fit the denoiser layers best (score > 0.5), or ``None``."""
    paths: Iterable[str]
    layers = getattr(lora_or_paths, "layers", None)
    if layers is not None:
        # the denoiser's names tell the family; text encoders (CLIP, T5) are shared between families
        paths = [layer.path for layer in layers.values() if layer.component in (None, "denoiser")]
    else:
        paths = list(lora_or_paths)  # type: ignore[arg-type]
    best, score = None, 0.5
    for family in FAMILIES:
        s = family.matches_file(paths)
        if s > score:
            best, score = family.name, s
    return best
