"""Per-sample reconstruction error delta(x, x_hat): MSE or iSSIM = 1 - SSIM."""

from __future__ import annotations

import torch
from pytorch_msssim import ssim
from .choices import LOSSES
from .errors import UserError



def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")
    return name


def per_sample_delta(x: torch.Tensor, x_hat: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """delta for each sample: (N, C, H, W) x 2 -> (N,).

    MSE is the mean squared error over C, H, W; iSSIM is 1 - SSIM with an 11x11
    Gaussian window (pytorch-msssim defaults) and data range 1, computed per
    channel and averaged over the channels (colour: the mean of R, G and B's).
    """
    if x.shape != x_hat.shape:
        raise UserError(f"shape mismatch: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    if loss == "mse":
        return (x - x_hat).pow(2).flatten(1).mean(dim=1)
    if loss == "issim":
        return 1.0 - ssim(x, x_hat, data_range=1.0, size_average=False)
    check_loss(loss)
    raise AssertionError("unreachable")

