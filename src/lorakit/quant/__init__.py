"""LoRAs on quantized models: recognition of each library's quantized layers (torchao, bitsandbytes, diffusers
GGUF, optimum-quanto, fp8 with a separate scale), the fuse route through dequantize/requantize, and fp8 rounding.
"""

from __future__ import annotations

from .branch import BranchPatch, apply_branch
from .fp8 import FP8_DTYPES, Fp8ScaledLinear, round_fp8
from .lowrank import (
    LowRankKind,
    LowRankQuantLinear,
    branch_commit,
    branch_stage,
    load_lowrank,
    lowrank_state_dict,
    quantize_model,
    quantize_state_dict,
)
from .patching import (
    QuantOptions,
    Staged,
    commit,
    describe,
    is_quantized,
    proxy,
    register_output_hook,
    stage,
    warn_lossy,
)
from .schemes import KINDS, QuantInfo, QuantKind, kind_of, swap_state

__all__ = [
    "FP8_DTYPES", "KINDS", "BranchPatch", "Fp8ScaledLinear", "LowRankQuantLinear", "QuantInfo", "QuantKind",
    "QuantOptions", "Staged", "apply_branch", "branch_commit", "branch_stage", "commit", "describe", "is_quantized",
    "kind_of", "load_lowrank", "lowrank_state_dict", "proxy", "quantize_model", "quantize_state_dict",
    "register_output_hook", "round_fp8", "stage", "swap_state", "warn_lossy",
]

KINDS.insert(0, LowRankKind())  # before Fp8ScaledKind: its fp8 residual also has a weight_scale
