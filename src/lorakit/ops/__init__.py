"""Offline LoRA tools (no live model needed): extract from two checkpoints, merge into a checkpoint,
compose several LoRAs, resize ranks, validate against a fine-tune, and split a checkpoint with a LoRA inside. The CLI wraps these functions.
"""

from __future__ import annotations

from .common import OpResult, Record
from .compose import ComposeInput, ComposeLayerStat, ComposeSummary, compose
from .extract import ExtractLayerStat, ExtractSummary, extract
from .merge import MergeLoraReport, MergeSummary, merge
from .resize import ResizeLayerStat, ResizeSummary, resize
from .split import SplitSummary, split
from .validate import SpuriousRow, ValidateRow, ValidateSummary, validate

__all__ = [
    "ComposeInput",
    "ComposeLayerStat",
    "ComposeSummary",
    "ExtractLayerStat",
    "ExtractSummary",
    "MergeLoraReport",
    "MergeSummary",
    "OpResult",
    "Record",
    "ResizeLayerStat",
    "ResizeSummary",
    "SplitSummary",
    "SpuriousRow",
    "ValidateRow",
    "ValidateSummary",
    "compose",
    "extract",
    "merge",
    "resize",
    "split",
    "validate",
]
