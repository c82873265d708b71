"""Offline LoRA tools (no live model needed): extract from two checkpoints, merge into a checkpoint,
compose several LoRAs, resize ranks and validate against a fine-tune. The CLI wraps these functions.
"""

from __future__ import annotations

from .common import OpResult
from .compose import compose
from .extract import extract
from .merge import merge
from .resize import resize
from .validate import validate

__all__ = ["OpResult", "compose", "extract", "merge", "resize", "validate"]
