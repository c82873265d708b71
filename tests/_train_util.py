"""Helpers of the training tests: a synthetic data set of coloured shapes, an existing LoRA file on the tiny UNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import lorakit
from lorakit.model import Layer, LoRA

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def make_shapes(folder: Path, n: int = 8, size: int = 40) -> Path:
    """``n`` images of coloured circles and squares on white, each with a same-stem caption."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for name, color in COLORS.items():
        for shape in ("circle", "square"):
            if i == n:
                return folder
            img = Image.new("RGB", (size, size + 8), (245, 245, 245))  # not square: the crop runs
            draw = ImageDraw.Draw(img)
            (draw.ellipse if shape == "circle" else draw.rectangle)((6, 10, size - 6, size - 2), fill=color)
            img.save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(f"a {name} {shape}")
            i += 1
    return folder


INIT_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.1.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv (LoCon)
]


def make_init(pipe, path: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    """A kohya fp16 file on the tiny UNet: attn1/attn2 projections, a 1x1 and a 3x3 conv, alpha != rank."""
    g = torch.Generator().manual_seed(3)
    modules = dict(pipe.unet.named_modules())
    layers = {}
    for path_ in INIT_MODULES:
        w = modules[path_].weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.3
        if w.dim() == 2:
            down = down.reshape(rank, -1)
        weight = lorakit.adapters.LoRAWeights(down=down, up=up, alpha=alpha)
        name = "unet." + path_
        layers[name] = Layer(name=name, component="denoiser", path=path_, weight=weight)
    return lorakit.save(LoRA(layers=layers, format="lorakit"), path, "kohya", dtype="fp16")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a training test module (the tests compare runs; 2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
