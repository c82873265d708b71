"""The small model and inputs the OFT / BOFT / (IA)³ / GLoRA tests run LyCORIS and lorakit on."""

from __future__ import annotations

import torch
from torch import nn


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.tanh(self.fc1(x))), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 16, generator=g), torch.randn(2, 8, 6, 6, generator=g)
