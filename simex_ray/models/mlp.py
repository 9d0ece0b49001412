"""A fully connected autoencoder: a cheap, shape-agnostic control."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import LEGACY, ImageFormat
from .layers import Act
from .registry import register_autoencoder


@register_autoencoder("mlp")
class MLPAutoencoder(nn.Module):
    """Fully connected P-256-64-256-P autoencoder (P = C·H·W, 784 at 1×28×28): a cheap control for any format."""

    def __init__(self, code_size: int = 64, hidden: int = 256, image_format: ImageFormat = LEGACY):
        super().__init__()
        self.code_size, self.image_format = code_size, image_format
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(image_format.pixels, hidden), Act(), nn.Linear(hidden, code_size)
        )
        self.decoder = nn.Sequential(
            Act(), nn.Linear(code_size, hidden), Act(), nn.Linear(hidden, image_format.pixels), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code).view(-1, *self.image_format.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
