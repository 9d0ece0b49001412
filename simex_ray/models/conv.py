"""A convolutional autoencoder for any image format: stride-2 blocks down, a linear code, the mirror up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..formats import LEGACY, ImageFormat
from .layers import Act
from .registry import register_autoencoder
from ..errors import UserError

KERNEL, STRIDE, PAD = 4, 2, 1  # each block halves both sides (floor); k = 2·stride: no checkerboard going up
SMALLEST = 4  # stop halving once the longer side is at most this
MIN_SIDE = 8  # below this there is nothing left to convolve


@dataclass(frozen=True)
class Cost:
    """Size and work of one architecture at one format."""

    params: int
    macs: int  # multiply-adds per image, forward pass

    @property
    def flops(self) -> int:
        """FLOP per image (2 per multiply-add), the unit of torch's FLOP counter and of a matmul ceiling."""
        return 2 * self.macs


def conv_sides(fmt: ImageFormat) -> list[tuple[int, int]]:
    """(height, width) at every stage: the input's, then after each block, until the longer side is ≤ 4."""
    sides = [(fmt.height, fmt.width)]
    while max(sides[-1]) > SMALLEST:
        h, w = sides[-1]
        sides.append((h // 2, w // 2))
    return sides


@register_autoencoder("conv")
class ConvAutoencoder(nn.Module):
    """Stride-2 convolution blocks down to at most 4×4, a linear bottleneck, and the mirror up.

    Block i (from 1) is a 4×4 stride-2 convolution to ``min(width·2^(i-1), max_width)`` channels
    and an ELU; there are as many blocks as halvings take the longer side to 4 or less (3 at 28×28
    and 32×32, 4 at 64×64). The code is a linear map of the last block's features. The decoder is
    a linear map back, an ELU, then 4×4 stride-2 transposed convolutions mirroring the blocks
    (``output_padding`` restores odd sides) and a sigmoid: output (N, C, H, W) in [0, 1].
    """

    def __init__(self, code_size: int = 128, width: int = 16, max_width: int = 128,
                 image_format: ImageFormat = LEGACY):
        super().__init__()
        why = self.refuses(image_format)
        if why:
            raise UserError(why)
        self.code_size, self.image_format = code_size, image_format
        self.sides = conv_sides(image_format)
        c = self.channels = [image_format.channels] + [min(width * 2**i, max_width) for i in range(len(self.sides) - 1)]
        self.down = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], KERNEL, STRIDE, PAD) for i in range(len(c) - 1))
        h, w = self.sides[-1]
        self.code_shape = (c[-1], h, w)
        self.to_code = nn.Linear(c[-1] * h * w, code_size)
        self.from_code = nn.Linear(code_size, c[-1] * h * w)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c[i + 1], c[i], KERNEL, STRIDE, PAD, output_padding=self.output_padding(i))
            for i in reversed(range(len(c) - 1))
        )
        self.act = Act()

    def output_padding(self, i: int) -> tuple[int, int]:
        """What the transposed convolution back to stage i adds to 2× the side (0, or 1 for an odd side)."""
        (h, w), (h2, w2) = self.sides[i], self.sides[i + 1]
        return h - 2 * h2, w - 2 * w2

    @classmethod
    def refuses(cls, fmt: ImageFormat) -> str | None:
        h, w = fmt.height, fmt.width
        if min(h, w) < MIN_SIDE:
            return (f"architecture 'conv' needs both sides at least {MIN_SIDE}, got {fmt}; use --arch mlp, or "
                    f"--image-format to convert the data to a larger format (e.g. {fmt.channels}x32x32)")
        blocks = len(conv_sides(fmt)) - 1
        if min(h, w) < 2**blocks:
            return (f"architecture 'conv' halves both sides of {fmt} {blocks} times (until the longer is at most "
                    f"{SMALLEST}), so the shorter must be at least {2**blocks}, got {min(h, w)}; use a squarer "
                    f"format (e.g. {fmt.channels}x{max(h, w)}x{max(h, w)}), or --arch mlp")
        return None

    @classmethod
    def cost(cls, image_format: ImageFormat | str = LEGACY, **kwargs) -> Cost:
        """Parameters and forward multiply-adds per image at ``image_format``, counted from the layer shapes."""
        model = cls(image_format=ImageFormat.parse(image_format), **kwargs)
        macs = 0
        for conv, (h, w) in zip(model.down, model.sides[1:]):  # each output position: C_in·k² per output channel
            macs += h * w * conv.out_channels * conv.in_channels * KERNEL * KERNEL
        for up, (h, w) in zip(model.up, reversed(model.sides[1:])):  # each input position scatters C_out·k²
            macs += h * w * up.in_channels * up.out_channels * KERNEL * KERNEL
        macs += model.to_code.weight.numel() + model.from_code.weight.numel()
        return Cost(params=sum(p.numel() for p in model.parameters()), macs=macs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, code_size)."""
        for conv in self.down:
            x = self.act(conv(x))  # (N, c_i, H / 2^i, W / 2^i)
        return self.to_code(x.flatten(1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(N, code_size) -> (N, C, H, W) in [0, 1]."""
        h = self.act(self.from_code(code)).view(-1, *self.code_shape)
        for k, up in enumerate(self.up):
            h = up(h)
            h = self.act(h) if k < len(self.up) - 1 else torch.sigmoid(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
