"""lorakit: read, write, apply, extract, merge, compose, resize and serve LoRA adapters for diffusion models.

    import lorakit
    lora = lorakit.load("style.safetensors")
    patch = lorakit.apply(pipe, [(lora, 0.8), ("char.safetensors", 0.6)])
    patch.remove()  # bit-exact restore
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    FormatError,
    IncompleteAdapterError,
    LorakitError,
    MatchError,
    NonFiniteError,
    OverwriteError,
    RankMismatchError,
    ShapeMismatchError,
    SourceNotFoundError,
    UnknownFormatError,
    UnsafeFileError,
    UnsupportedAdapterError,
)
from .model import Layer, LoadReport, LoRA

__version__ = "0.1.0"

# Heavier parts are imported on first use so `import lorakit` stays fast and light.
_LAZY = {
    "Patch": "lorakit.runtime",
    "apply": "lorakit.runtime",
    "compose": "lorakit.ops",
    "extract": "lorakit.ops",
    "inspect": "lorakit.inspection",
    "load": "lorakit.formats",
    "merge": "lorakit.ops",
    "resize": "lorakit.ops",
    "save": "lorakit.saving",
    "slots": "lorakit.runtime.slots",
    "split": "lorakit.ops",
    "tiny_pipeline": "lorakit.pipelines",
    "validate": "lorakit.ops",
}

__all__ = [
    "FormatError",
    "IncompleteAdapterError",
    "Layer",
    "LoRA",
    "LoadReport",
    "LorakitError",
    "MatchError",
    "NonFiniteError",
    "OverwriteError",
    "Patch",
    "RankMismatchError",
    "ShapeMismatchError",
    "SourceNotFoundError",
    "UnknownFormatError",
    "UnsafeFileError",
    "UnsupportedAdapterError",
    "__version__",
    "apply",
    "compose",
    "extract",
    "inspect",
    "load",
    "merge",
    "resize",
    "save",
    "slots",
    "split",
    "tiny_pipeline",
    "validate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
