"""Model families and name resolution: extra names for the modules of SDXL, SD3, FLUX.1, Wan and Cosmos
(``base.py``, one module per family) and the one :class:`Resolver` (``resolve.py``) that places LoRA layers on
live modules, meta-device modules or checkpoint keys. Importing this package registers the built-in families.
"""

# importing each module registers its family
from . import clip as _clip  # noqa: F401
from . import cosmos as _cosmos  # noqa: F401
from . import flux as _flux  # noqa: F401
from . import flux2 as _flux2  # noqa: F401
from . import hidream as _hidream  # noqa: F401
from . import hunyuanvideo as _hunyuanvideo  # noqa: F401
from . import krea2 as _krea2  # noqa: F401
from . import ltx2 as _ltx2  # noqa: F401
from . import ltx_video as _ltx_video  # noqa: F401
from . import lumina2 as _lumina2  # noqa: F401
from . import qwen_image as _qwen_image  # noqa: F401
from . import sd1 as _sd1  # noqa: F401
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
from .detect import Candidate, FileEvidence, detect, family_scores
from .resolve import GENERIC, CheckpointNames, Resolution, Resolver, Router, checkpoint_router, components_of

__all__ = [
    "FAMILIES",
    "GENERIC",
    "Alias",
    "Candidate",
    "CheckpointNames",
    "Family",
    "FileEvidence",
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
    "family_candidates",
    "register_family",
]


def detect_family(lora_or_paths: object) -> str | None:
    """The one registered family the file is for (:mod:`lorakit.families.detect`: names, then widths and block
    coverage when names tie), or ``None`` when none fits or the best cannot be told apart."""
    return detect(lora_or_paths)


def family_candidates(lora_or_paths: object) -> list[Candidate]:
    """Every family that recognises part of the file, with its scores, best first (what ``inspect`` shows)."""
    return family_scores(lora_or_paths)
