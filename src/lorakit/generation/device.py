"""Where a pipeline runs: ``--device``, ``--dtype`` and ``--offload`` of ``lorakit generate`` and ``lorakit serve``.

* :func:`resolve_device` — ``auto`` takes CUDA, then MPS, then the CPU; asking for a device this machine lacks is a
  :class:`~lorakit.errors.DeviceError`, never a silent fall back to the CPU.
* :func:`resolve_dtype` — ``auto`` is bf16 on a CUDA device that supports it, else fp32.
* :func:`place_pipeline` — moves (or CPU-offloads) the pipeline. Offload needs an accelerator: with the CPU as the
  device there is nothing to offload to, so ``offload`` other than ``"none"`` is a ``DeviceError`` there.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DeviceError

__all__ = ["DEVICES", "DTYPES", "OFFLOADS", "place_pipeline", "resolve_device", "resolve_dtype"]

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "fp16": torch.float16,
                                          "bf16": torch.bfloat16}
OFFLOADS = ("none", "model", "sequential")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` / ``"mps"`` -> a ``torch.device`` this machine has.

    ``auto``: the current CUDA device if there is one, else MPS, else the CPU. A device that is absent (CUDA on a
    CPU-only machine, ``cuda:3`` with two GPUs) raises :class:`DeviceError` naming ``--device``."""
    if isinstance(name, torch.device):
        name = str(name)
    text = name.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use --device auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name}: this machine has no CUDA GPU visible to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise DeviceError(f"--device {name}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu or auto")
        return device
    raise DeviceError(f"unsupported device {name!r}; use --device auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` / ``"fp32"`` / ``"fp16"`` / ``"bf16"`` (or a torch dtype) -> a torch dtype for ``device``.

    ``auto``: bf16 on a CUDA device that supports it (Ampere and later), else fp32 (also on MPS and the CPU)."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use --dtype {', '.join(DTYPES)}")
    dtype = DTYPES[key]
    if dtype is not None:
        return dtype
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def place_pipeline(pipe: Any, device: torch.device | str, dtype: torch.dtype | None = None,
                   offload: str = "none") -> Any:
    """Cast ``pipe`` to ``dtype`` (``None``: keep) and put it on ``device``; returns the pipeline.

    ``offload="model"`` (diffusers ``enable_model_cpu_offload``: whole components move to the GPU when they run) and
    ``"sequential"`` (``enable_sequential_cpu_offload``: submodule by submodule, slowest, least memory) keep the
    weights in CPU memory and need an accelerator ``device``; on the CPU they raise :class:`DeviceError`."""
    if offload not in OFFLOADS:
        raise DeviceError(f"unknown offload {offload!r}; use --offload {', '.join(OFFLOADS)}")
    device = torch.device(device)
    if offload == "none":
        return pipe.to(device=device, dtype=dtype) if dtype is not None else pipe.to(device)
    if device.type == "cpu":
        raise DeviceError(f"--offload {offload} moves weights between CPU memory and a GPU, but the device is the "
                          "CPU; drop --offload (or pass --device cuda)")
    if dtype is not None:
        pipe.to(dtype=dtype)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe
