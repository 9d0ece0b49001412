"""The scoring engine: every member of a fleet on unknown images at once (Ray-free).

``ScoringEngine.per_sample(x)`` returns δ(x_n, A_m(x_n)) for every member m
and sample n, a (members × N) array, streaming x (N, C, H, W) in chunks so
memory stays flat in N. Members are grouped by (architecture, loss, layer
shapes); a group of LeNet or of conv autoencoders runs *fused*: one forward
pass computes all of them.

How the fused LeNet pass works (shapes for M members, a chunk of N images):

* conv1 of every member sees the same image, so the M 6-channel convolutions
  are one 6M-channel convolution: (N, 1, 28, 28) -> (N, 6M, 28, 28);
* conv2 and both decoder convolutions run one call per member (grouped
  convolutions measured slower);
* the four FC layers are batched matrix products over members (M, N, ·);
* each ``ConvTranspose2d`` (stride 1) is rewritten as the ``Conv2d`` with the
  flipped, transposed kernel and ``padding = k - 1 - p``: the last
  1-channel transposed convolution dominated the naive forward time;
* δ is computed on (N, M, 28, 28) directly: MSE as a mean over pixels, iSSIM
  with SSIM's per-channel statistics (members as channels).

How the fused conv pass works (:class:`FusedConv`):

* block 1 of every member is one wide convolution of the shared input,
  (N, C, H, W) -> (N, M·c_1, H/2, W/2); the later blocks run member after member,
  all of one member's blocks before the next member's (grouped convolutions, and
  one layer for every member before the next layer, measured slower);
* the two linear maps (to and from the code) are batched matmuls (M, N, ·);
* each 4×4 stride-2 ``ConvTranspose2d`` is rewritten as one 2×2 convolution
  producing its four output phases, spread out by one strided copy
  (:func:`phase_weights`): PyTorch's CPU transposed convolution is its slow
  generic path;
* ELU in place from vectorised kernels (``F.elu`` measured several times slower);
* a chunk runs in passes small enough that one member's largest activation fits
  a core's L2 cache (:func:`pass_rows`);
* δ is computed on (N, M, C, H, W): MSE as the mean over C, H, W; iSSIM as SSIM
  per channel averaged over channels, the unknown's statistics computed once.

With ``latent=True`` (members with latent moments, :mod:`simex_ray.fleet.latent`) the same pass also gives
each sample's latent distance z: the fused modules hand out the bottleneck codes (M, N, D) they compute
anyway, and :func:`mahalanobis` is one float64 batched matmul per group, O(M·N·D²): within the noise of
``bench/latent_scoring.py`` (docs/results.md, "Latent scoring cost"). No second forward pass.

Each choice was kept only where ``bench/scoring.py`` measured it faster
(docs/results.md, "Scoring engine"; docs/architectures.md); the engine equals
the naive per-member path to float tolerance (tests).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .device import prefetch
from .losses import check_loss, per_sample_delta
from .models import ConvAutoencoder, LeNetAutoencoder
from .models.conv import KERNEL, PAD, STRIDE
from .choices import DEVICES
from .errors import UserError, check_members

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``cpu``, ``cuda`` (an error naming the fix when there is none) or ``auto`` (cuda if present)."""
    if isinstance(name, torch.device):
        return name
    name = name or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}'; known: {', '.join(DEVICES)}")
    return torch.device(name)


def _elu(x: torch.Tensor) -> torch.Tensor:
    """ELU (alpha 1) as exp(min(x, 0)) - 1 + relu(x): the same values (to float rounding), from kernels
    that are vectorised on CPU (``F.elu`` measured about 2x slower on this PyTorch build)."""
    return torch.clamp_max(x, 0.0).exp_().sub_(1.0).add_(torch.relu(x))


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling (stride 2, even sizes) as two elementwise maxima of strided views: exactly
    ``F.max_pool2d(x, 2)``, which measured 15x slower (it also computes the argmax indices)."""
    r = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(r[..., 0::2], r[..., 1::2])


@functools.lru_cache(maxsize=None)
def polyphase_matrix(k: int, pad: int) -> tuple[torch.Tensor, int, int]:
    """The linear map from a k×k kernel (of a convolution with padding ``pad`` after a ×2 nearest upsample)
    to its four phase kernels: (k·k, 4·kk·kk) of zeros and ones, kk, and the phase convolution's padding.
    Output phase (a, b) sees low-resolution offset (a + u - pad) // 2 through tap u (rows; columns alike)."""
    offs = {a: [(a + u - pad) // 2 for u in range(k)] for a in (0, 1)}
    lo = min(min(v) for v in offs.values())
    kk = max(max(v) for v in offs.values()) - lo + 1
    with torch.inference_mode(False):  # cached: a normal tensor, usable by training too, whoever built it first
        m = torch.zeros(k * k, 2, 2, kk, kk)
        for a in (0, 1):
            for b in (0, 1):
                for u in range(k):
                    for v in range(k):
                        m[u * k + v, a, b, offs[a][u] - lo, offs[b][v] - lo] = 1.0
        return m.reshape(k * k, -1), kk, -lo


def polyphase_weights(w: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
    """A convolution after a ×2 nearest upsample, as a convolution of the low-resolution input.

    ``conv2d(upsample2(x), w, padding=pad) == pixel_shuffle(conv2d(x, w', padding=pad'), 2)``:
    each of the four output phases (row parity a, column parity b) sees every low-resolution
    pixel through the sum of the taps that land on it (:func:`polyphase_matrix`). w (out, in, k, k) ->
    w' (4 out, in, k', k') with channels ordered (out, a, b). The upsampled tensor is never built and there
    are about 2.8x fewer multiply-adds (k' = 3 instead of 5 at a quarter of the positions). Differentiable
    in ``w`` (fused training uses it on the members' weights).
    """
    out_c, in_c, k, _ = w.shape
    m, kk, new_pad = polyphase_matrix(k, pad)
    w4 = (w.reshape(out_c * in_c, k * k) @ m.to(w)).reshape(out_c, in_c, 2, 2, kk, kk)
    return w4.permute(0, 2, 3, 1, 4, 5).reshape(4 * out_c, in_c, kk, kk), new_pad


class FusedLeNet(nn.Module):
    """M LeNet autoencoders as one network: (N, 1, 28, 28) -> reconstructions (N, M, 28, 28)."""

    def __init__(self, models: Sequence[LeNetAutoencoder], *, polyphase: bool = True, grouped: bool = False,
                 fast_ops: bool = True):
        super().__init__()
        self.polyphase, self.grouped, self.fast_ops = polyphase, grouped, fast_ops
        self.m = m = len(models)
        if not m:
            raise UserError("FusedLeNet needs at least one model")

        def cat(get):
            return torch.cat([get(a).detach() for a in models])

        def stack(get):
            return torch.stack([get(a).detach() for a in models])

        # encoder convolutions: conv1 is one wide convolution, conv2 grouped
        self.register_buffer("c1_w", cat(lambda a: a.features[0].weight))  # (6M, 1, 5, 5)
        self.register_buffer("c1_b", cat(lambda a: a.features[0].bias))
        self.register_buffer("c2_w", cat(lambda a: a.features[3].weight))  # (16M, 6, 5, 5)
        self.register_buffer("c2_b", cat(lambda a: a.features[3].bias))
        # FC layers as batched matmuls: weights (M, in, out)
        fcs = [lambda a: a.bottleneck[1], lambda a: a.bottleneck[3], lambda a: a.expand[1], lambda a: a.expand[3]]
        for k, get in enumerate(fcs):
            self.register_buffer(f"fc{k}_w", stack(lambda a, g=get: g(a).weight.t()))
            self.register_buffer(f"fc{k}_b", stack(lambda a, g=get: g(a).bias).unsqueeze(1))  # (M, 1, out)

        # decoder: ConvTranspose2d(in, out, k, padding p) == Conv2d(flip(W).T, padding k - 1 - p), and the
        # ×2 upsample before it folded into the convolution (``polyphase_weights``)
        def as_conv(t: nn.ConvTranspose2d) -> tuple[torch.Tensor, int]:
            w, pad = t.weight.detach().flip(-1, -2).transpose(0, 1), t.kernel_size[0] - 1 - t.padding[0]
            return polyphase_weights(w, pad) if self.polyphase else (w.contiguous(), pad)

        t1 = [as_conv(a.reconstruct[1]) for a in models]
        t2 = [as_conv(a.reconstruct[4]) for a in models]
        rep = 4 if self.polyphase else 1
        self.register_buffer("d1_w", torch.cat([w for w, _ in t1]))  # (6M·rep, 16, k, k)
        self.register_buffer("d1_b", cat(lambda a: a.reconstruct[1].bias).repeat_interleave(rep))
        self.register_buffer("d2_w", torch.cat([w for w, _ in t2]))  # (M·rep, 6, k, k)
        self.register_buffer("d2_b", cat(lambda a: a.reconstruct[4].bias).repeat_interleave(rep))
        self.d1_pad, self.d2_pad = t1[0][1], t2[0][1]
        self.floats_per_image = self.c1_w.shape[0] // m * 28 * 28  # one member's largest activation: conv1's

    def _fc(self, h: torch.Tensor, k: int) -> torch.Tensor:
        return torch.baddbmm(getattr(self, f"fc{k}_b"), h, getattr(self, f"fc{k}_w"))

    @staticmethod
    def _pool_elu(h: torch.Tensor) -> torch.Tensor:
        # ELU is increasing, so pooling first gives the same values with a quarter of the ELU work
        return _elu(_pool2(h))

    @staticmethod
    def _elu_pool(h: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.elu(h), 2)

    def _conv(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int) -> torch.Tensor:
        """Member k's convolution on its own channels, for every k: grouped, or one call per member."""
        if self.grouped or self.m == 1:
            return F.conv2d(h, w, b, padding=padding, groups=self.m)
        hs, ws, bs = h.chunk(self.m, 1), w.chunk(self.m, 0), b.chunk(self.m, 0)
        return torch.cat([F.conv2d(hk, wk, bk, padding=padding) for hk, wk, bk in zip(hs, ws, bs)], 1)

    def _up_conv(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int) -> torch.Tensor:
        if self.polyphase:
            return F.pixel_shuffle(self._conv(h, w, b, padding), 2)
        return self._conv(F.interpolate(h, scale_factor=2), w, b, padding)

    def forward(self, x: torch.Tensor, codes: bool = False):
        """Reconstructions (N, M, 28, 28); with ``codes`` also each member's bottleneck codes (M, N, 84),
        ``encode(x)`` of every member, from the same pass."""
        n, m = x.shape[0], self.m
        elu, act_pool = (_elu, self._pool_elu) if self.fast_ops else (F.elu, self._elu_pool)
        h = act_pool(F.conv2d(x, self.c1_w, self.c1_b, padding=2))  # (N, 6M, 14, 14)
        h = act_pool(self._conv(h, self.c2_w, self.c2_b, 0))  # (N, 16M, 5, 5)
        h = h.reshape(n, m, 400).transpose(0, 1)  # (M, N, 400)
        code = self._fc(elu(self._fc(h, 0)), 1)  # (M, N, 84): the codes
        h = elu(self._fc(elu(self._fc(elu(code), 2)), 3))  # (M, N, 400)
        h = h.transpose(0, 1).reshape(n, m * 16, 5, 5)
        h = elu(self._up_conv(h, self.d1_w, self.d1_b, self.d1_pad))  # (N, 6M, 14, 14)
        recon = torch.sigmoid(self._up_conv(h, self.d2_w, self.d2_b, self.d2_pad))  # (N, M, 28, 28)
        return (recon, code) if codes else recon


def _elu_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_elu` in place (x is overwritten): one temporary instead of two, about 2x faster again."""
    e = torch.clamp_max(x, 0.0).exp_().sub_(1.0)
    return x.clamp_min_(0.0).add_(e)


def phase_weights(w: torch.Tensor) -> torch.Tensor:
    """A 4×4 stride-2 padding-1 transposed convolution as one 2×2 convolution per output phase.

    Output pixel (2j + a, 2k + b) of ``conv_transpose2d(x, w, stride=2, padding=1)`` sees the 2×2
    input window starting at (j - 1 + a, k - 1 + b) through taps (3 - a - 2t, 3 - b - 2r) of w. So
    ``conv2d(x, w', padding=1)``, whose window at row r starts at input row r - 1, holds phase (a, b)
    at rows j + a, columns k + b. w (in, out, 4, 4) -> w' (4 out, in, 2, 2), channels ordered
    (out, a, b). The multiply-adds are those of the transposed convolution (plus one row and column).
    """
    c_in, c_out = w.shape[:2]
    wf = w.flip(-1, -2).transpose(0, 1)  # (out, in, 4, 4), tap a + 2t at index [a + 2t]
    return wf.reshape(c_out, c_in, 2, 2, 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(4 * c_out, c_in, 2, 2).contiguous()


def interleave_phases(r: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 4C, H + 1, W + 1) phases from :func:`phase_weights` -> (N, C, *size), size = 2H or 2H + 1 per side.

    ``out``: where to write (any (N, C, *size) view whose last two axes are contiguous). At size (2H, 2W)
    the phases are read through one strided view and written in one copy; an odd side takes four.
    """
    n, c4, h1, w1 = r.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    out = r.new_empty(n, c, *size) if out is None else out
    if tuple(size) == (2 * h, 2 * w):
        s = r.stride()  # channel (c, a, b) is 4c + 2a + b; phase (a, b) at (j, k) is row j + a, column k + b
        phases = r.as_strided((n, c, h, 2, w, 2), (s[0], 4 * s[1], s[2], 2 * s[1] + s[2], s[3], s[1] + s[3]))
        out.view(n, c, h, 2, w, 2).copy_(phases)  # (N, C, j, a, k, b) = (N, C, 2j + a, 2k + b)
        return out
    r = r.view(n, c, 2, 2, h1, w1)
    for a in (0, 1):
        for b in (0, 1):
            rows, cols = (size[0] - a + 1) // 2, (size[1] - b + 1) // 2
            out[:, :, a::2, b::2] = r[:, :, a, b, a:a + rows, b:b + cols]
    return out


class FusedConv(nn.Module):
    """M :class:`ConvAutoencoder` of one shape as one network: (N, C, H, W) -> (N, M, C, H, W).

    Block 1 is one wide convolution (every member sees the same image) and the two linear maps
    are batched matmuls over members; the other blocks run member after member, each member's
    blocks one after the other, so only one member's activations are live between them (layer
    after layer across all members measured slower: M times the working set).
    """

    def __init__(self, models: Sequence[ConvAutoencoder], *, polyphase: bool = True, fast_ops: bool = True):
        super().__init__()
        self.polyphase, self.fast_ops = polyphase, fast_ops
        self.m = m = len(models)
        if not m:
            raise UserError("FusedConv needs at least one model")
        first = models[0]
        shapes = [tuple(p.shape) for p in first.parameters()]
        if any([tuple(p.shape) for p in a.parameters()] != shapes or a.sides != first.sides for a in models):
            raise UserError("FusedConv needs autoencoders of one shape (format, widths, code size)")
        if (KERNEL, STRIDE, PAD) != (4, 2, 1):
            raise AssertionError("phase_weights is written for 4x4 stride-2 padding-1 transposed convolutions")
        self.format, self.sides, self.code_shape = first.image_format, first.sides, first.code_shape

        def cat(get):
            return torch.cat([get(a).detach() for a in models])

        def stack(get):
            return torch.stack([get(a).detach() for a in models])

        # encoder: block 1 one wide convolution over the shared input; weights (M·c_out, c_in, 4, 4)
        self.n_down, self.n_up = len(first.down), len(first.up)
        for i in range(self.n_down):
            self.register_buffer(f"down{i}_w", cat(lambda a, i=i: a.down[i].weight))
            self.register_buffer(f"down{i}_b", cat(lambda a, i=i: a.down[i].bias))
        # the two linear maps as batched matmuls: weights (M, in, out), biases (M, 1, out)
        self.register_buffer("code_w", stack(lambda a: a.to_code.weight.t()))
        self.register_buffer("code_b", stack(lambda a: a.to_code.bias).unsqueeze(1))
        self.register_buffer("back_w", stack(lambda a: a.from_code.weight.t()))
        self.register_buffer("back_b", stack(lambda a: a.from_code.bias).unsqueeze(1))
        # decoder: each transposed convolution as the 2×2 convolution of its four output phases,
        # (M·4·c_out, c_in, 2, 2); or as it is, (M·c_in, c_out, 4, 4)
        rep = 4 if polyphase else 1
        for i in range(self.n_up):
            self.register_buffer(f"up{i}_w", torch.cat([
                phase_weights(a.up[i].weight.detach()) if polyphase else a.up[i].weight.detach() for a in models]))
            self.register_buffer(f"up{i}_b", cat(lambda a, i=i: a.up[i].bias).repeat_interleave(rep))
        self.up_sizes = list(reversed(self.sides[:-1]))
        self.up_padding = [up.output_padding for up in first.up]
        # one member's largest activation per image, in floats (the engine sizes its passes by it)
        self.floats_per_image = max(c * (h + 2) * (w + 2) for c, (h, w) in zip(first.channels, self.sides))

    def _member(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = getattr(self, f"{name}_w"), getattr(self, f"{name}_b")
        return w.chunk(self.m)[k], b.chunk(self.m)[k]

    def _up(self, h: torch.Tensor, i: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Member k's transposed convolution i: (N, c_in, h, w) -> (N, c_out, 2h (+1), 2w (+1)); the last
        one ends in the sigmoid and writes into ``out``."""
        w, b = self._member(f"up{i}", k)
        last = i == self.n_up - 1
        if not self.polyphase:
            h = F.conv_transpose2d(h, w, b, stride=STRIDE, padding=PAD, output_padding=self.up_padding[i])
            return out.copy_(torch.sigmoid_(h)) if last else h
        r = F.conv2d(h, w, b, padding=1)  # (N, 4·c_out, h + 1, w + 1): the four phases
        return interleave_phases(torch.sigmoid_(r) if last else r, self.up_sizes[i], out=out)

    def forward(self, x: torch.Tensor, codes: bool = False):
        """Reconstructions (N, M, C, H, W); with ``codes`` also the bottleneck codes (M, N, code_size), each
        member's ``encode(x)``, from the same pass."""
        n, m = x.shape[0], self.m
        elu = _elu_ if self.fast_ops else F.elu
        h = elu(F.conv2d(x, self.down0_w, self.down0_b, stride=STRIDE, padding=PAD))  # (N, M·c_1, H/2, W/2)
        feats = []
        for k, h in enumerate(h.chunk(m, 1)):  # member k: (N, c_1, H/2, W/2) -> its last block, flat
            for i in range(1, self.n_down):
                h = elu(F.conv2d(h, *self._member(f"down{i}", k), stride=STRIDE, padding=PAD))
            feats.append(h.reshape(n, -1))
        code = torch.baddbmm(self.code_b, torch.stack(feats), self.code_w)  # (M, N, code_size)
        h = elu(torch.baddbmm(self.back_b, code, self.back_w))  # (M, N, c·h·w)
        out = x.new_empty(n, m, *self.format.shape)  # (N, M, C, H, W)
        for k, h in enumerate(h.view(m, n, *self.code_shape).unbind(0)):
            for i in range(self.n_up - 1):
                h = elu(self._up(h, i, k))
            self._up(h, self.n_up - 1, k, out=out[:, k])
        return (out, code) if codes else out


WINDOW = 11  # SSIM's Gaussian window (pytorch-msssim's default)


def _gaussian_window(size: int = WINDOW, sigma: float = 1.5, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def delta_per_member(x: torch.Tensor, recon: torch.Tensor, loss: str) -> torch.Tensor:
    """δ of one image batch against M reconstructions: x (N, C, H, W), recon (N, M, C, H, W) -> (N, M).

    The fused variant of :func:`simex_ray.losses.per_sample_delta` (the reference: tests hold them equal for
    both losses, grey and colour), kept because it computes the unknown's statistics once for every member.

    recon (N, M, H, W) is read as C = 1 (the fused LeNet's output). MSE is the mean over C, H, W.
    iSSIM = 1 − SSIM with pytorch-msssim's defaults (11×11 Gaussian window, σ 1.5, data range 1,
    K = (0.01, 0.03), valid filtering; an axis shorter than the window is not filtered), SSIM
    computed per channel and averaged over channels, as ``pytorch_msssim.ssim`` does.
    """
    if recon.dim() == 4:
        if min(recon.shape[-2:]) >= WINDOW:
            return _delta_grey(x, recon, loss)
        recon = recon.unsqueeze(2)  # (N, M, 1, H, W)
    if loss == "mse":
        return (recon - x.unsqueeze(1)).pow(2).mean(dim=(2, 3, 4))
    check_loss(loss)
    n, m, c, h, w = recon.shape
    g = _gaussian_window(device=x.device).to(x.dtype)
    y = recon.reshape(n, m * c, h, w)
    mu_x, mu_y = _blur(x, g), _blur(y, g)  # the unknown's statistics once per channel, not once per member
    s_xx = _blur(x * x, g) - mu_x * mu_x
    s_yy = _blur(y * y, g) - mu_y * mu_y
    s_xy = _blur((recon * x.unsqueeze(1)).reshape(n, m * c, h, w), g)

    def members(t):  # (N, M·C, h', w') -> (N, M, C, h', w')
        return t.view(n, m, c, *t.shape[2:])

    mu_x, s_xx = mu_x.unsqueeze(1), s_xx.unsqueeze(1)  # (N, 1, C, h', w'): broadcast over members
    mu_y, s_yy = members(mu_y), members(s_yy)
    s_xy = members(s_xy) - mu_x * mu_y
    return 1.0 - _ssim_map(mu_x, mu_y, s_xx, s_yy, s_xy).flatten(3).mean(-1).mean(-1)


def _ssim_map(mu_x, mu_y, s_xx, s_yy, s_xy):
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    return ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * cs


def _blur(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of every channel of (N, K, H, W), valid; an axis shorter than the window is
    left as it is (pytorch-msssim does the same, with a warning)."""
    k = t.shape[1]
    if t.shape[-1] >= len(g):
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    if t.shape[-2] >= len(g):
        t = F.conv2d(t, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    return t


def _delta_grey(x: torch.Tensor, recon: torch.Tensor, loss: str) -> torch.Tensor:
    """x (N, 1, H, W), recon (N, M, H, W) -> (N, M): the fused LeNet's δ, members as channels."""
    if loss == "mse":
        return (recon - x).pow(2).mean(dim=(2, 3))
    check_loss(loss)
    m = recon.shape[1]
    g = _gaussian_window(device=x.device).to(x.dtype)

    def blur(t):  # the one blur of the fused δ (measured as fast as a blur of its own here: 2026-12-07)
        return _blur(t, g)

    xs = x.expand(-1, m, -1, -1)
    mu_x, mu_y = blur(xs), blur(recon)
    s_xx = blur(xs * xs) - mu_x * mu_x
    s_yy = blur(recon * recon) - mu_y * mu_y
    s_xy = blur(xs * recon) - mu_x * mu_y
    return 1.0 - _ssim_map(mu_x, mu_y, s_xx, s_yy, s_xy).flatten(2).mean(-1)


FUSED = {LeNetAutoencoder: FusedLeNet, ConvAutoencoder: FusedConv}
PASS_FLOATS = 1 << 19  # per thread: a fused conv pass's largest activation per member, at most (2 MB, one L2)
# A fused pass's largest activation, all its members together, at most (16 MB), on the CPU. glibc serves each
# thread but the main one from its own arena of 64 MB heaps: a larger block is a fresh mmap on every pass
# and page-faulted in again, which measured 2.3-2.8x slower at 30-100 LeNet members on a helper thread (Ray
# Data's and Serve's user-code threads). Fleets above it run as several fused passes per chunk, which
# measured as fast as one on the main thread (docs/results.md "Batch scoring").
PASS_FLOATS_ALL = 1 << 22
PLANS_KEPT = 8  # fused plans (member subset x loss) an engine keeps, least recently used dropped first


@dataclass
class _Group:
    names: list[str]
    loss: str
    fused: nn.Module | None  # FusedLeNet or FusedConv, or None: run the members one by one
    models: list[nn.Module]
    rows: int  # images per forward pass
    # the latent moments of the group's members that have them: their positions in ``names``, the means
    # (M', 1, D) and precisions (M', D, D), float64 on the engine's device
    latent_rows: list[int] | None = None
    latent_mean: torch.Tensor | None = None
    latent_precision: torch.Tensor | None = None


def mahalanobis(codes: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """The latent distance z = (c - μ)ᵀ P (c - μ) / D of each code from its member's training-code
    distribution, for M members at once: codes (M, N, D), mean (M, 1, D), precision (M, D, D) -> (M, N).

    One batched matmul, O(M·N·D²), in float64 (codes of bfloat16 passes are widened first): a precision
    of codes with a near-flat direction has large entries, and z is a difference of large terms there.
    Divided by D so members of different code sizes are on one scale (about 1 for a member's own data).
    """
    c = codes.to(torch.float64) - mean
    return (torch.bmm(c, precision) * c).sum(-1) / c.shape[-1]


def pass_rows(fused: nn.Module | None, chunk: int, scale: float = 1.0) -> int:
    """Images per forward pass: the chunk, or fewer where one member's activations in a fused conv pass
    would outgrow a core's L2 cache (:data:`PASS_FLOATS` per thread; ``scale`` times that, for the benchmark).
    A quarter and four times that measured slower or no faster (docs/architectures.md)."""
    if not isinstance(fused, FusedConv):
        return chunk
    return max(1, min(chunk, int(scale * PASS_FLOATS * torch.get_num_threads()) // fused.floats_per_image))


def members_per_pass(one: nn.Module, members: int, rows: int, device: torch.device) -> int:
    """Of ``members`` alike (``one``: one of them fused), how many one pass of ``rows`` images fuses: all of
    them on a GPU; on the CPU, as many as keep the pass's largest activation within :data:`PASS_FLOATS_ALL`."""
    if device.type != "cpu":
        return members
    return max(1, min(members, PASS_FLOATS_ALL // (rows * one.floats_per_image)))


class ScoringEngine:
    """Per-sample δ of unknown images through every member, fused where the architecture allows.

    ``models`` and ``losses`` are keyed by member name (a fleet's order).
    ``chunk``: images per forward pass (memory stays flat in N).
    ``fused=False`` runs each member on its own (the naive reference path).
    ``moments``: {member: (μ (D,), P (D, D))}, the latent moments of the members that have them
    (:mod:`simex_ray.fleet.latent`); with them ``per_sample(..., latent=True)`` also returns each sample's
    latent distance z (:func:`mahalanobis`) from the codes of the same forward pass.
    """

    def __init__(self, models: Mapping[str, nn.Module], losses: Mapping[str, str], *, device="cpu",
                 chunk: int = 256, fused: bool = True, keep_memory: bool = False, precision: str = "fp32",
                 moments: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        from .training import PRECISIONS

        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")
        self.precision = precision  # "bf16": forward passes under bfloat16 autocast, δ always in fp32
        self.device = resolve_device(device)
        if keep_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.names = list(models)
        self.losses = dict(losses)
        self.chunk, self.fused = int(chunk), fused
        self._models = {n: m.to(self.device).eval() for n, m in models.items()}
        self._moments = {n: (torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=self.device),
                             torch.as_tensor(np.asarray(p), dtype=torch.float64, device=self.device))
                         for n, (mu, p) in (moments or {}).items() if n in self._models}
        # fused weights per (members, loss) asked for, the most recently used kept: each plan holds a copy of
        # its members' weights, and a service that is asked for many subsets must not keep them all
        self._groups: OrderedDict[tuple[str, ...], list[_Group]] = OrderedDict()

    def _plan(self, names: tuple[str, ...], loss: str | None) -> list[_Group]:
        key = (*names, "|", loss or "")
        if key in self._groups:
            self._groups.move_to_end(key)
        else:
            by: dict[tuple, list[str]] = {}
            for n in names:  # one group per architecture, loss and layer shapes (format, widths)
                model = self._models[n]
                shapes = tuple(tuple(p.shape) for p in model.parameters())
                by.setdefault((type(model), loss or self.losses[n], shapes), []).append(n)
            groups = []
            for (arch, group_loss, _), members in by.items():
                models = [self._models[n] for n in members]
                if not (self.fused and arch in FUSED):
                    groups.append(_Group(members, group_loss, None, models, self.chunk))
                    continue
                one = FUSED[arch](models[:1])  # the pass's shape, per member
                rows = pass_rows(one, self.chunk)
                step = members_per_pass(one, len(members), rows, self.device)
                for i in range(0, len(members), step):
                    fused = FUSED[arch](models[i:i + step]).to(self.device).eval()
                    groups.append(_Group(members[i:i + step], group_loss, fused, models[i:i + step], rows))
            for g in groups:
                have = [k for k, n in enumerate(g.names) if n in self._moments]
                if have:
                    g.latent_rows = have
                    g.latent_mean = torch.stack([self._moments[g.names[k]][0] for k in have]).unsqueeze(1)
                    g.latent_precision = torch.stack([self._moments[g.names[k]][1] for k in have])
            self._groups[key] = groups
            while len(self._groups) > PLANS_KEPT:
                self._groups.popitem(last=False)
        return self._groups[key]

    @property
    def latent_members(self) -> list[str]:
        """The members with latent moments (their z is computed with ``latent=True``)."""
        return [n for n in self.names if n in self._moments]

    @torch.inference_mode()
    def per_sample(self, x, names: Iterable[str] | None = None, loss: str | None = None, *,
                   latent: bool = False) -> np.ndarray:
        """δ for every member and sample: (len(names), N) float64, members in ``names`` order.

        ``latent``: (len(names), 2, N): [:, 0] δ, [:, 1] the latent distance z of each sample's code
        (:func:`mahalanobis`; NaN for a member without moments), both from one forward pass."""
        parts = list(self.iter_chunks(x, names, loss, latent=latent))
        names = list(names) if names is not None else self.names
        return np.concatenate(parts, axis=-1) if parts else np.zeros((len(names), *((2,) if latent else ()), 0))

    @torch.inference_mode()
    def iter_chunks(self, x, names: Iterable[str] | None = None, loss: str | None = None, *,
                    latent: bool = False) -> Iterator[np.ndarray]:
        """Like :meth:`per_sample`, one (members, chunk) (or (members, 2, chunk)) block at a time; ``x`` may
        be any indexable of (N, C, H, W) images (an array, a memory map) or an iterable of such blocks."""
        names = tuple(check_members(names, self.names)) if names is not None else tuple(self.names)
        if loss is not None:
            check_loss(loss)
        groups = self._plan(names, loss)
        row = {n: i for i, n in enumerate(names)}
        for xb in prefetch(_blocks(x, self.chunk), self.device):  # on CUDA the next chunk's copy overlaps
            out = np.empty((len(names), len(xb)))
            z_out = np.full((len(names), len(xb)), np.nan) if latent else None
            half = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
            for g in groups:
                codes = latent and g.latent_rows is not None
                parts, z_parts = [], []
                for xr in torch.split(xb, g.rows):
                    if g.fused is not None:
                        with half:
                            recon = g.fused(xr, codes=True) if codes else g.fused(xr)
                        if codes:
                            recon, code = recon  # code (M, rows, D): the same pass's bottleneck
                        parts.append(delta_per_member(xr, recon.float(), g.loss).t())  # (M, rows)
                    else:
                        with half:
                            if codes:  # decode(encode(x)) is each architecture's forward: still one pass
                                code = torch.stack([m.encode(xr).flatten(1) for m in g.models])
                                recons = [m.decode(c) for m, c in zip(g.models, code.unbind(0))]
                            else:
                                recons = [m(xr) for m in g.models]
                        parts.append(torch.stack([per_sample_delta(xr, r.float(), g.loss) for r in recons]))
                    if codes:
                        z_parts.append(mahalanobis(code[g.latent_rows], g.latent_mean, g.latent_precision))
                d = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                out[[row[n] for n in g.names]] = d.double().cpu().numpy()
                if codes:
                    z = z_parts[0] if len(z_parts) == 1 else torch.cat(z_parts, 1)
                    z_out[[row[g.names[k]] for k in g.latent_rows]] = z.cpu().numpy()
            yield np.stack([out, z_out], axis=1) if latent else out


_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Keep freed memory inside the process (glibc ``mallopt``), once per process.

    Only processes whose work is scoring call it (`simex score` and `simex matrix`, the Serve scorers, the batch
    scoring actors), at their start; an engine built elsewhere (training, experiments, a library user's
    process) leaves the allocator alone unless asked (``ScoringEngine(keep_memory=True)``).

    Every chunk allocates the same few multi-megabyte tensors; by default glibc
    hands each one back to the kernel when freed and the next allocation
    page-faults it in again, which measured as a third of the scoring time.
    With the mmap and trim thresholds raised, freed blocks are reused. Memory
    stays bounded by the chunk size (it is not returned to the OS between
    chunks). A no-op where glibc is not the allocator; returns whether it applied.
    """
    global _MEMORY_KEPT
    if _MEMORY_KEPT:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    _MEMORY_KEPT = ok
    return ok


def _blocks(x, chunk: int) -> Iterator[np.ndarray]:
    """``x`` (an indexable of images, or an iterable of blocks of them) in pieces of at most ``chunk``."""
    if isinstance(x, (np.ndarray, torch.Tensor)) or hasattr(x, "__getitem__") and hasattr(x, "__len__"):
        for start in range(0, len(x), chunk):
            yield x[start:start + chunk]
    else:
        for block in x:
            for start in range(0, len(block), chunk):
                yield block[start:start + chunk]
