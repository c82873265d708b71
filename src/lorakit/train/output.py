"""Writing what a run trained: ``same`` (the ``--init`` file with only the trained tensors replaced, every other
key byte-identical, names/alphas/metadata kept) or a kohya / PEFT file through :func:`lorakit.save`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoRAWeights
from ..formats import split_key
from ..formats.conventions import peft_prefix
from ..io import read_tensors, write_tensors
from ..model import Layer, LoRA
from ..saving import save
from .network import Network

__all__ = ["denoiser_prefix", "to_lora", "write"]


def denoiser_prefix(pipe: Any) -> str:
    """``unet.`` or ``transformer.``: the name head new layers get (kohya turns it into its own prefix)."""
    return peft_prefix("denoiser", transformer=getattr(pipe, "unet", None) is None)


def to_lora(network: Network, source: LoRA | None) -> LoRA:
    """The trained LoRA: the ``source`` file's layers with the trained factors swapped in (their dtype kept), or
    new layers named ``<prefix><module path>`` on the denoiser."""
    factors = network.factors()
    if source is not None:
        layers = dict(source.layers)
        for name, (down, up) in factors.items():
            layer = layers[name]
            w = layer.weight
            new = dataclasses.replace(w, down=down.to(w.down.dtype).reshape(w.down.shape).clone(),
                                      up=up.to(w.up.dtype).reshape(w.up.shape).clone())
            layers[name] = dataclasses.replace(layer, weight=new)
        return dataclasses.replace(source, layers=layers, source=None)
    layers = {}
    for e in network.entries:
        down, up = factors[e.name]
        weight = LoRAWeights(down=down.clone(), up=up.clone(), alpha=e.module.alpha)
        layers[e.name] = Layer(name=e.name, component=e.target.component, path=e.target.module, weight=weight)
    return LoRA(layers=layers, metadata={"lorakit_trainer": "lorakit train"}, format="lorakit")


def _same(network: Network, source: LoRA, path: Path) -> Path:
    """The input file's own tensors, the trained layers' ``down``/``up`` keys replaced in their dtype and shape."""
    tensors, meta = read_tensors(source.source)
    factors = network.factors()
    for name, (down, up) in factors.items():
        for key in source.layers[name].keys:
            parsed = split_key(key)
            field = None if parsed is None else parsed[1]
            if field in ("down", "up"):
                new = down if field == "down" else up
                old = tensors[key]
                tensors[key] = new.detach().to(old.dtype).reshape(old.shape).clone()
    return write_tensors(tensors, path, meta, inputs=[source.source])


def write(network: Network, source: LoRA | None, path: str | os.PathLike[str], fmt: str, pipe: Any) -> Path:
    """Write the run's LoRA to ``path`` atomically in ``fmt`` (``same`` needs ``source``)."""
    path = Path(path)
    if fmt == "same":
        if source is None or source.source is None:
            raise ValueError("format='same' needs the init file the LoRA was read from")
        return _same(network, source, path)
    inputs = [] if source is None else [source.source]
    lora = to_lora(network, source)
    model = pipe if fmt == "peft" else None
    with torch.no_grad():
        return save(lora, path, fmt, model=model, inputs=inputs)
