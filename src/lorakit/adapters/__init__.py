"""Adapter types: one file per type, each registered through :func:`register_adapter` (first match wins,
in registration order)."""

from .base import ADAPTERS, LowRank, WeightAdapter, adapter_for_fields, register_adapter
from .boft import BOFT
from .dora import DoRA
from .full import FullDiff, NormDiff
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHaWeights
from .lokr import LoKrWeights
from .lora import LoRAWeights
from .oft import DiagOFT, KohyaOFT
from .saved import SavedModule

__all__ = [
    "ADAPTERS",
    "BOFT",
    "IA3",
    "DiagOFT",
    "DoRA",
    "FullDiff",
    "GLoRA",
    "KohyaOFT",
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
