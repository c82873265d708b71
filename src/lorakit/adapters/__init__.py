"""Adapter types: one file per type, each registered through :func:`register_adapter` (first match wins,
in registration order)."""

from .base import ADAPTERS, LowRank, WeightAdapter, adapter_for_fields, register_adapter
from .dora import DoRA
from .full import FullDiff, NormDiff
from .loha import LoHaWeights
from .lokr import LoKrWeights
from .lora import LoRAWeights
from .saved import SavedModule

__all__ = [
    "ADAPTERS",
    "DoRA",
    "FullDiff",
    "LoHaWeights",
    "LoKrWeights",
    "LoRAWeights",
    "LowRank",
    "NormDiff",
    "SavedModule",
    "WeightAdapter",
    "adapter_for_fields",
    "register_adapter",
]
