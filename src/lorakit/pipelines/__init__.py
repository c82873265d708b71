"""diffusers integration: the built-in tiny pipelines (random weights from configs in code, tokenizers built at
runtime, no download), one per family, and loading of local diffusers folders.

Each tiny family lives in its own module of this package, which exposes ``build(seed) -> pipeline`` (fp32, on
the CPU); :func:`tiny_pipeline` seeds, builds, disables the progress bar and casts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_FAMILIES", "load_pipeline", "tiny_model_name", "tiny_pipeline"]

# family name -> module of this package that builds it. ``--model tiny-<family>`` on the CLI; ``tiny`` is sd1.
TINY_FAMILIES: dict[str, str] = {
    "sd1": "sd1",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "wan-t2v": "wan",
    "wan-i2v": "wan",
    "wan22": "wan",  # Wan 2.2 A14B: two experts (transformer, transformer_2)
    "cosmos": "cosmos",
    # wave 2 families
    "flux2": "flux2",
    "flux-kontext": "flux",
    "qwen-image": "qwen_image",
    "qwen-image-edit": "qwen_image",
    "z-image": "z_image",
    "hunyuanvideo": "hunyuanvideo",
    "ltx-video": "ltx",
    "ltx2": "ltx2",
    "hidream": "hidream",
    "lumina2": "lumina2",
    "krea2": "krea2",
}


def _builder(family: str) -> Any:
    from ..errors import SourceNotFoundError

    module_name = TINY_FAMILIES.get(family)
    if module_name is None:
        raise SourceNotFoundError(f"no tiny pipeline for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module_name}":
            raise
        raise SourceNotFoundError(f"the tiny {family!r} pipeline is not built yet in this version of lorakit") from None
    builder = getattr(module, f"build_{family.replace('-', '_')}", None) or module.build
    return builder


def tiny_pipeline(family: str = "sd1", seed: int = 0, *, dtype: torch.dtype = torch.float32) -> Any:
    """A real diffusers pipeline of ``family`` with tiny random weights: same ``seed`` -> identical weights.

    ``tiny_pipeline(0)`` (an int first) is the SD1 pipeline, as before families were added."""
    if isinstance(family, int):  # tiny_pipeline(seed) of the first version
        family, seed = "sd1", family
    pipe = _builder(family)(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def tiny_model_name(model: str) -> str | None:
    """``"tiny"`` -> ``"sd1"``, ``"tiny-wan-t2v"`` -> ``"wan-t2v"``; ``None`` for anything else (a folder)."""
    if model == "tiny":
        return "sd1"
    if model.startswith("tiny-") and model[5:] in TINY_FAMILIES:
        return model[5:]
    return None


def load_pipeline(model: str, *, dtype: torch.dtype | None = None) -> Any:
    """``"tiny"``/``"tiny-<family>"`` -> :func:`tiny_pipeline`; otherwise a local diffusers folder (no download)."""
    family = tiny_model_name(model)
    if family is not None:
        return tiny_pipeline(family, 0, dtype=dtype or torch.float32)
    path = Path(model)
    if not (path / "model_index.json").is_file():
        from ..errors import SourceNotFoundError

        raise SourceNotFoundError(
            f"{model}: not a diffusers pipeline folder (no model_index.json); pass a folder written by "
            "save_pretrained, 'tiny' for the built-in test pipeline, or tiny-<family> "
            f"({', '.join(TINY_FAMILIES)})"
        )
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
