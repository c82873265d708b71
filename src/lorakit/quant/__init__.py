"""LoRAs on quantized models: recognition of each library's quantized layers (torchao, bitsandbytes, diffusers
GGUF, optimum-quanto, fp8 with a separate scale), the fuse route through dequantize/requantize, and fp8 rounding.
"""

from __future__ import annotations

from .fp8 import FP8_DTYPES, Fp8ScaledLinear, round_fp8
from .patching import QuantOptions, Staged, commit, describe, is_quantized, proxy, stage, warn_lossy
from .schemes import KINDS, QuantInfo, QuantKind, kind_of, swap_state

__all__ = [
    "FP8_DTYPES", "KINDS", "Fp8ScaledLinear", "QuantInfo", "QuantKind", "QuantOptions", "Staged", "commit",
    "describe", "is_quantized", "kind_of", "proxy", "round_fp8", "stage", "swap_state", "warn_lossy",
]
