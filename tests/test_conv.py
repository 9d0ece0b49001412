"""The conv architecture at any format, and the scoring engine on colour and fused conv members (no Ray)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pytorch_msssim import ssim
from torch.utils.flop_counter import FlopCounterMode

from simex_ray.formats import FormatError, ImageFormat
from simex_ray.losses import per_sample_delta
from simex_ray.models import ConvAutoencoder, create_autoencoder, default_architecture, refusal
from simex_ray.scoring import FusedConv, ScoringEngine, delta_per_member, interleave_phases, phase_weights

FORMATS = ["1x28x28", "3x32x32", "3x64x64", "3x96x96", "1x8x8", "3x31x17"]


def _conv(fmt, k=1, seed=0, **kwargs):
    torch.manual_seed(seed)
    return [create_autoencoder("conv", fmt, **kwargs).eval() for _ in range(k)]


def _images(fmt, n, seed=0):
    return np.random.default_rng(seed).random((n, *ImageFormat.parse(fmt).shape)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_reconstructs_at_its_format_through_its_code(fmt):
    (model,) = _conv(fmt, code_size=32)
    x = torch.from_numpy(_images(fmt, 3))
    with torch.no_grad():
        code, out = model.encode(x), model(x)
        assert code.shape == (3, 32)
        assert out.shape == x.shape
        torch.testing.assert_close(model.decode(code), out)


def test_conv_is_the_default_away_from_the_papers_format():
    assert default_architecture("3x32x32") == "conv" and default_architecture("1x28x28") == "lenet"
    assert create_autoencoder(default_architecture("3x64x64"), "3x64x64").image_format == ImageFormat(3, 64, 64)


@pytest.mark.parametrize("fmt, says", [("1x7x7", "at least 8"), ("3x4x32", "at least 8"),
                                       ("3x64x8", "shorter must be at least 16, got 8")])
def test_conv_refuses_a_format_it_cannot_take_in_one_line(fmt, says):
    why = refusal("conv", fmt)
    assert why and "\n" not in why and fmt in why and says in why and "--arch mlp" in why
    with pytest.raises(FormatError) as err:
        create_autoencoder("conv", fmt)
    assert str(err.value) == why


@pytest.mark.parametrize("fmt", ["1x28x28", "3x32x32", "3x64x64", "3x31x17"])
def test_cost_counts_the_parameters_and_torchs_flop_counter(fmt):
    cost = ConvAutoencoder.cost(fmt)
    (model,) = _conv(fmt)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *ImageFormat.parse(fmt).shape))
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.flops == 2 * cost.macs == counter.get_total_flops()


def test_a_transposed_convolution_is_its_four_phases():
    torch.manual_seed(0)
    for h, w, op in ((4, 4, (0, 0)), (7, 4, (1, 0)), (8, 5, (0, 1))):
        up = torch.nn.ConvTranspose2d(6, 5, 4, 2, 1, output_padding=op)
        x = torch.randn(2, 6, h, w)
        size = (2 * h + op[0], 2 * w + op[1])
        r = torch.nn.functional.conv2d(x, phase_weights(up.weight.detach()), up.bias.repeat_interleave(4), padding=1)
        torch.testing.assert_close(interleave_phases(r, size), up(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["1x28x28", "3x32x32", "3x31x17"])
@pytest.mark.parametrize("options", [{}, {"polyphase": False}, {"fast_ops": False}])
def test_fused_conv_reconstructs_like_each_autoencoder(fmt, options):
    models = _conv(fmt, 3)
    x = torch.from_numpy(_images(fmt, 5))
    with torch.no_grad():
        out = FusedConv(models, **options)(x)
        assert out.shape == (5, 3, *x.shape[1:])
        for k, m in enumerate(models):
            torch.testing.assert_close(out[:, k], m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["3x32x32", "1x28x28"])
@pytest.mark.parametrize("loss", ["mse", "issim"])
def test_fused_engine_equals_the_naive_path(fmt, loss):
    models = {f"m{i}": m for i, m in enumerate(_conv(fmt, 3))}
    x = _images(fmt, 45)
    losses = {n: loss for n in models}
    fused = ScoringEngine(models, losses, chunk=16).per_sample(x)
    naive = ScoringEngine(models, losses, chunk=45, fused=False).per_sample(x)
    with torch.no_grad():
        t = torch.from_numpy(x)
        direct = np.stack([per_sample_delta(t, m(t), loss).double().numpy() for m in models.values()])
    assert fused.shape == (3, 45)
    np.testing.assert_allclose(naive, direct, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fused, naive, rtol=2e-5, atol=1e-7)


def test_engine_groups_conv_members_by_shape_and_streams_blocks():
    wide, narrow = _conv("3x32x32", 2), _conv("3x32x32", 1, seed=1, code_size=16)
    models = {"a": wide[0], "narrow": narrow[0], "b": wide[1]}
    losses = {"a": "issim", "narrow": "issim", "b": "mse"}
    x = _images("3x32x32", 30, seed=2)
    e = ScoringEngine(models, losses, chunk=8)
    whole = e.per_sample(x)
    np.testing.assert_allclose(whole, ScoringEngine(models, losses, fused=False).per_sample(x), rtol=2e-5, atol=1e-7)
    blocks = np.concatenate(list(e.iter_chunks(iter([x[:7], x[7:23], x[23:]]))), axis=1)
    np.testing.assert_allclose(blocks, whole, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 40, 24), (1, 28, 28), (3, 8, 8)])
def test_colour_issim_is_ssim_per_channel_averaged_as_pytorch_msssim(shape):
    x, recon = torch.rand(4, *shape), torch.rand(4, 3, *shape)  # 3 members
    ours = delta_per_member(x, recon, "issim")
    assert ours.shape == (4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-msssim warns when a side is shorter than its window
        for k in range(3):
            theirs = 1 - ssim(x, recon[:, k], data_range=1, size_average=False)
            torch.testing.assert_close(ours[:, k], theirs, rtol=1e-5, atol=1e-6)
    if shape[0] == 3:  # the mean of the three grey SSIMs, channel by channel
        grey = torch.stack([delta_per_member(x[:, c:c + 1], recon[:, :, c], "issim") for c in range(3)]).mean(0)
        torch.testing.assert_close(ours, grey, rtol=1e-5, atol=1e-6)


def test_colour_mse_is_the_mean_over_channels_and_pixels():
    x, recon = torch.rand(4, 3, 16, 16), torch.rand(4, 2, 3, 16, 16)
    expected = ((recon - x[:, None]) ** 2).flatten(2).mean(-1)
    torch.testing.assert_close(delta_per_member(x, recon, "mse"), expected)
