"""Batches moved to the compute device one step ahead: batch i+1's host-to-device copy runs while step i computes.

On CUDA the loader thread pins each batch's tensors (:func:`pin`), and :func:`device_feed` issues the next
batch's copies (``non_blocking``) on a side stream before handing out the current one; the compute stream waits
for the side stream's copies of a batch before its first use, and each tensor is marked as used by the compute
stream (``record_stream``) so the allocator does not reuse its memory early (pinned host blocks are kept by
torch's host allocator until their copies complete). On a CPU the tensors are handed
on as they are (the loader's own thread already prepares batches ahead: ``BatchStream(prefetch=...)``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from cryohet.data.loader import Batch


def pin(data: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``data``'s CPU tensors in page-locked memory when ``device`` is a GPU (so their copies are asynchronous)."""
    if device.type != "cuda":
        return data
    return {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in data.items()}


def device_feed(batches: Iterable[Batch], device: torch.device
                ) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
    """(batch, its ``data`` on ``device``) in order, the next batch's copy queued before the current is used."""
    if device.type != "cuda":
        for batch in batches:
            yield batch, {k: v.to(device) for k, v in batch.data.items()}
        return
    side = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def upload(batch: Batch) -> dict[str, torch.Tensor]:
        with torch.cuda.stream(side):
            return {k: v.to(device, non_blocking=True) for k, v in batch.data.items()}

    it = iter(batches)
    nxt = next(it, None)
    ahead = upload(nxt) if nxt is not None else {}
    while nxt is not None:
        cur, data = nxt, ahead
        compute.wait_stream(side)
        for v in data.values():
            v.record_stream(compute)
        nxt = next(it, None)
        if nxt is not None:
            ahead = upload(nxt)
        yield cur, data
