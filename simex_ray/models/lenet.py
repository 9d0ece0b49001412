"""The paper's autoencoder: a LeNet-5 encoder and its mirror."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import LEGACY, ImageFormat
from .layers import Act
from .registry import register_autoencoder
from ..errors import UserError


def lenet_features() -> nn.Sequential:
    """LeNet-5's convolutions: (N, 1, 28, 28) -> (N, 16, 5, 5); shared with the baseline classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), Act(), nn.MaxPool2d(2),  # (N, 6, 14, 14)
        nn.Conv2d(6, 16, 5), Act(), nn.MaxPool2d(2),  # (N, 16, 5, 5)
    )


@register_autoencoder("lenet")
class LeNetAutoencoder(nn.Module):
    """Symmetric autoencoder whose encoder is LeNet-5 (the paper's choice).

    conv5x5x6 -> pool -> conv5x5x16 -> pool -> FC120 -> FC84, decoder mirrored
    with upsampling and transposed convolutions; sigmoid output in [0, 1].
    ELU, not ReLU: on mostly-black digit images ReLU (and leaky ReLU) decoders
    collapsed to a constant output in a third of short MNIST runs (Adam, lr
    1e-3); ELU never did and reached about half the error.
    """

    def __init__(self, code_size: int = 84, image_format: ImageFormat = LEGACY):
        super().__init__()
        if self.refuses(image_format):
            raise UserError(self.refuses(image_format))
        self.code_size, self.image_format = code_size, LEGACY
        self.features = lenet_features()
        self.bottleneck = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), Act(), nn.Linear(120, code_size)
        )
        self.expand = nn.Sequential(
            Act(), nn.Linear(code_size, 120), Act(), nn.Linear(120, 16 * 5 * 5), Act()
        )
        self.reconstruct = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.ConvTranspose2d(16, 6, 5), Act(),  # (N, 6, 14, 14)
            nn.Upsample(scale_factor=2), nn.ConvTranspose2d(6, 1, 5, padding=2),  # (N, 1, 28, 28)
            nn.Sigmoid(),
        )

    @classmethod
    def refuses(cls, fmt: ImageFormat) -> str | None:
        if fmt != LEGACY:
            return (f"architecture 'lenet' is the paper's {LEGACY} autoencoder and cannot take {fmt}; "
                    f"use --arch conv (any format), or --image-format {LEGACY} to convert the data")
        return None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) -> (N, code_size)."""
        return self.bottleneck(self.features(x))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(N, code_size) -> (N, 1, 28, 28)."""
        return self.reconstruct(self.expand(code).view(-1, 16, 5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
