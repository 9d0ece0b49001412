"""Batches from host memory to the device, the next one's copy overlapping the current one's compute (Ray-free).

:func:`prefetch` is what training and scoring loops iterate over instead of calling ``.to(device)`` on each
batch. On a CUDA device each host batch is copied into pinned (page-locked) memory and sent with
``non_blocking=True`` on a side stream one batch ahead, so the copy of batch i+1 runs while batch i computes;
a uint8 batch travels as uint8 (a quarter of float32's bytes) and becomes float32 on the device. Anywhere
else it is the plain path (``.to(device)``, pinning needs an accelerator). Either way the batches come in
the same order with the same float32 values (tests).

Unmeasured on a GPU so far (none was lent): ``bench/gpu.py`` times training and scoring with and without it
(docs/results.md, "bfloat16 and GPUs").
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

# host dtypes sent as they are (and made float32 on the device); anything else is made float32 on the host
_SENT = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


def float_batch(batch: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """One batch (an array or a tensor) as float32 on ``device``: the plain, synchronous path."""
    if torch.is_tensor(batch):
        return batch.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(batch, dtype=np.float32)).to(device)


def pinned(batch: Any) -> torch.Tensor:
    """``batch`` in page-locked host memory, uint8 or float32 (other dtypes become float32); needs CUDA."""
    if torch.is_tensor(batch):
        t = batch if batch.dtype in (torch.uint8, torch.float32) else batch.float()
        return t if t.is_pinned() else t.pin_memory()
    a = np.asarray(batch)
    if a.dtype not in _SENT:
        a = a.astype(np.float32)
    out = torch.empty(a.shape, dtype=_SENT[a.dtype], pin_memory=True)
    out.numpy()[...] = a  # one host copy, straight into the pinned buffer
    return out


def prefetch(batches: Iterable[Any], device: torch.device | str) -> Iterator[torch.Tensor]:
    """``batches`` (arrays or tensors (B, ...)) as float32 tensors on ``device``, in order.

    On CUDA, batch i+1 is pinned and its copy queued on a side stream before batch i is handed out; the
    caller's stream waits for a batch's copy (an event) before using it. Elsewhere: :func:`float_batch`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        for b in batches:
            yield float_batch(b, device)
        return
    side = torch.cuda.Stream(device)

    def start(b) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = pinned(b)
        with torch.cuda.stream(side):
            sent = host.to(device, non_blocking=True)  # the host allocator keeps `host` until the copy is done
            copied = torch.cuda.Event()
            copied.record(side)
        return sent, copied

    def ready(sent: torch.Tensor, copied: torch.cuda.Event) -> torch.Tensor:
        current = torch.cuda.current_stream(device)
        current.wait_event(copied)
        sent.record_stream(current)  # allocated on the side stream, used on this one
        return sent if sent.dtype == torch.float32 else sent.float()

    waiting = None
    for b in batches:
        queued = start(b)
        if waiting is not None:
            yield ready(*waiting)
        waiting = queued
    if waiting is not None:
        yield ready(*waiting)


__all__ = ["float_batch", "pinned", "prefetch"]
