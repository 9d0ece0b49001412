"""A fully connected autoencoder: a cheap, shape-agnostic control."""

from __future__ import annotations

import torch
from torch import nn

from .layers import IMAGE_SHAPE, Act
from .registry import register_autoencoder


@register_autoencoder("mlp")
class MLPAutoencoder(nn.Module):
    """Fully connected 784-256-64-256-784 autoencoder: a cheap, shape-agnostic control."""

    def __init__(self, code_size: int = 64, hidden: int = 256):
        super().__init__()
        self.code_size = code_size
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, hidden), Act(), nn.Linear(hidden, code_size)
        )
        self.decoder = nn.Sequential(
            Act(), nn.Linear(code_size, hidden), Act(), nn.Linear(hidden, 28 * 28), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code).view(-1, *IMAGE_SHAPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
