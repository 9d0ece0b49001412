"""The scoring engine: every member of a fleet on unknown images at once (Ray-free).

``ScoringEngine.per_sample(x)`` returns δ(x_n, A_m(x_n)) for every member m
and sample n, a (members × N) array, streaming x in chunks so memory stays
flat in N. Members are grouped by (architecture, loss); a group of LeNet
autoencoders runs *fused*: one forward pass computes all of them.

How the fused LeNet pass works (shapes for M members, a chunk of N images):

* conv1 of every member sees the same image, so the M 6-channel convolutions
  are one 6M-channel convolution: (N, 1, 28, 28) -> (N, 6M, 28, 28);
* conv2 and both decoder convolutions are grouped convolutions with M groups;
* the four FC layers are batched matrix products over members (M, N, ·);
* each ``ConvTranspose2d`` (stride 1) is rewritten as the ``Conv2d`` with the
  flipped, transposed kernel and ``padding = k - 1 - p``: the last
  1-channel transposed convolution dominated the naive forward time;
* δ is computed on (N, M, 28, 28) directly: MSE as a mean over pixels, iSSIM
  with SSIM's per-channel statistics (members as channels).

Each choice was kept only where ``bench/scoring.py`` measured it faster
(README, "Performance"); the engine equals the naive per-member path to float
tolerance (tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .losses import check_loss, per_sample_delta
from .models import LeNetAutoencoder

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``cpu``, ``cuda`` (an error naming the fix when there is none) or ``auto`` (cuda if present)."""
    if isinstance(name, torch.device):
        return name
    name = name or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device '{name}'; known: {', '.join(DEVICES)}")
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


def polyphase_weights(w: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
    """A convolution after a ×2 nearest upsample, as a convolution of the low-resolution input.

    ``conv2d(upsample2(x), w, padding=pad) == pixel_shuffle(conv2d(x, w', padding=pad'), 2)``:
    each of the four output phases (row parity a, column parity b) sees every low-resolution
    pixel through the sum of the taps that land on it. w (out, in, k, k) -> w' (4 out, in, k', k')
    with channels ordered (out, a, b). The upsampled tensor is never built and there are about
    2.8x fewer multiply-adds (k' = 3 instead of 5 at a quarter of the positions).
    """
    out_c, in_c, k, _ = w.shape
    offs = {a: [(a + u - pad) // 2 for u in range(k)] for a in (0, 1)}
    lo = min(min(v) for v in offs.values())
    kk = max(max(v) for v in offs.values()) - lo + 1
    w2 = w.new_zeros(out_c, 2, 2, in_c, kk, kk)
    for a in (0, 1):
        for b in (0, 1):
            for u in range(k):
                for v in range(k):
                    w2[:, a, b, :, offs[a][u] - lo, offs[b][v] - lo] += w[:, :, u, v]
    return w2.reshape(out_c * 4, in_c, kk, kk), -lo


class FusedLeNet(nn.Module):
    """M LeNet autoencoders as one network: (N, 1, 28, 28) -> reconstructions (N, M, 28, 28)."""

    def __init__(self, models: Sequence[LeNetAutoencoder], *, polyphase: bool = True, grouped: bool = False,
                 fast_ops: bool = True):
        super().__init__()
        self.polyphase, self.grouped, self.fast_ops = polyphase, grouped, fast_ops
        self.m = m = len(models)
        if not m:
            raise ValueError("FusedLeNet needs at least one model")

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m = x.shape[0], self.m
        elu, act_pool = (_elu, self._pool_elu) if self.fast_ops else (F.elu, self._elu_pool)
        h = act_pool(F.conv2d(x, self.c1_w, self.c1_b, padding=2))  # (N, 6M, 14, 14)
        h = act_pool(self._conv(h, self.c2_w, self.c2_b, 0))  # (N, 16M, 5, 5)
        h = h.reshape(n, m, 400).transpose(0, 1)  # (M, N, 400)
        h = self._fc(elu(self._fc(h, 0)), 1)  # (M, N, 84): the codes
        h = elu(self._fc(elu(self._fc(elu(h), 2)), 3))  # (M, N, 400)
        h = h.transpose(0, 1).reshape(n, m * 16, 5, 5)
        h = elu(self._up_conv(h, self.d1_w, self.d1_b, self.d1_pad))  # (N, 6M, 14, 14)
        return torch.sigmoid(self._up_conv(h, self.d2_w, self.d2_b, self.d2_pad))  # (N, M, 28, 28)


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def delta_per_member(x: torch.Tensor, recon: torch.Tensor, loss: str) -> torch.Tensor:
    """δ of one image batch against M reconstructions: x (N, 1, 28, 28), recon (N, M, 28, 28) -> (N, M).

    iSSIM = 1 − SSIM with pytorch-msssim's defaults (11×11 Gaussian window,
    σ 1.5, data range 1, K = (0.01, 0.03), valid filtering), per channel.
    """
    if loss == "mse":
        return (recon - x).pow(2).mean(dim=(2, 3))
    check_loss(loss)
    m = recon.shape[1]
    g = _gaussian_window(device=x.device).to(x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    wh, ww = g.view(1, 1, 1, -1).repeat(m, 1, 1, 1), g.view(1, 1, -1, 1).repeat(m, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wh, groups=m), ww, groups=m)

    xs = x.expand(-1, m, -1, -1)
    mu_x, mu_y = blur(xs), blur(recon)
    s_xx = blur(xs * xs) - mu_x * mu_x
    s_yy = blur(recon * recon) - mu_y * mu_y
    s_xy = blur(xs * recon) - mu_x * mu_y
    cs = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * cs
    return 1.0 - ssim_map.flatten(2).mean(-1)


@dataclass
class _Group:
    names: list[str]
    loss: str
    fused: nn.Module | None  # FusedLeNet, or None: run the members one by one
    models: list[nn.Module]


class ScoringEngine:
    """Per-sample δ of unknown images through every member, fused where the architecture allows.

    ``models`` and ``losses`` are keyed by member name (a fleet's order).
    ``chunk``: images per forward pass (memory stays flat in N).
    ``fused=False`` runs each member on its own (the naive reference path).
    """

    def __init__(self, models: Mapping[str, nn.Module], losses: Mapping[str, str], *, device="cpu",
                 chunk: int = 256, fused: bool = True, keep_memory: bool = True):
        self.device = resolve_device(device)
        if keep_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.names = list(models)
        self.losses = dict(losses)
        self.chunk, self.fused = int(chunk), fused
        self._models = {n: m.to(self.device).eval() for n, m in models.items()}
        self._groups: dict[tuple[str, ...], list[_Group]] = {}

    def _plan(self, names: tuple[str, ...], loss: str | None) -> list[_Group]:
        key = (*names, "|", loss or "")
        if key not in self._groups:
            by: dict[tuple[str, str], list[str]] = {}
            for n in names:
                arch = type(self._models[n]).__name__
                by.setdefault((arch, loss or self.losses[n]), []).append(n)
            groups = []
            for (arch, group_loss), members in by.items():
                models = [self._models[n] for n in members]
                fused = None
                if self.fused and all(isinstance(m, LeNetAutoencoder) for m in models):
                    fused = FusedLeNet(models).to(self.device).eval()
                groups.append(_Group(members, group_loss, fused, models))
            self._groups[key] = groups
        return self._groups[key]

    @torch.inference_mode()
    def per_sample(self, x, names: Iterable[str] | None = None, loss: str | None = None) -> np.ndarray:
        """δ for every member and sample: (len(names), N) float64, members in ``names`` order."""
        parts = list(self.iter_chunks(x, names, loss))
        names = list(names) if names is not None else self.names
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(names), 0))

    @torch.inference_mode()
    def iter_chunks(self, x, names: Iterable[str] | None = None, loss: str | None = None) -> Iterator[np.ndarray]:
        """Like :meth:`per_sample`, one (members, chunk) block at a time; ``x`` may be any
        indexable of (N, 1, 28, 28) images (an array, a memory map) or an iterable of such blocks."""
        names = tuple(names) if names is not None else tuple(self.names)
        unknown = [n for n in names if n not in self._models]
        if unknown:
            raise KeyError(f"unknown member(s) {', '.join(unknown)}; fleet has: {', '.join(self.names)}")
        if loss is not None:
            check_loss(loss)
        groups = self._plan(names, loss)
        row = {n: i for i, n in enumerate(names)}
        for block in _blocks(x, self.chunk):
            xb = torch.as_tensor(np.asarray(block, dtype=np.float32)).to(self.device)
            out = np.empty((len(names), len(xb)))
            for g in groups:
                if g.fused is not None:
                    d = delta_per_member(xb, g.fused(xb), g.loss).t()  # (M, n)
                else:
                    d = torch.stack([per_sample_delta(xb, m(xb), g.loss) for m in g.models])
                out[[row[n] for n in g.names]] = d.double().cpu().numpy()
            yield out


_MEMORY_KEPT = False


def keep_freed_memory() -> bool:
    """Keep freed memory inside the process (glibc ``mallopt``), once per process.

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
