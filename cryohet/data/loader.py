"""Streaming particle images: memory-mapped, chunked, prefetching, shardable across ranks.

Memory does not grow with the number of particles: each read maps only the window of a stack that it
needs, copies the images out and unmaps it again (so the pages do not stay in the process's resident
set), and at most ``prefetch`` prepared batches wait in a queue. The per-particle metadata (poses, CTF)
stays with the caller (O(N) numbers, not images).

Shuffling is *chunked*: particles are taken in file order, cut into chunks of ``chunk_images``
consecutive images, the chunk order is permuted and particles are shuffled within groups of
``shuffle_window`` chunks. A dataset no larger than one group is shuffled fully. Every epoch's order is
a function of (seed, epoch) only, so all ranks of a distributed run agree on it without communicating
and a resumed run sees the same orders as an uninterrupted one.

Distributed runs cut each global batch of ``global_batch`` particles into ``world`` equal parts; rank r
reads and trains on part r only (:func:`shard_batches`).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryohet.io.reader import ImageReader

#: wraps an iterable of work items with a progress display: (items, description, total or None) -> items
Progress = Callable[[Iterable[Any], str, int | None], Iterable[Any]]

#: Bytes of images read per block when the caller does not set ``chunk_images``.
BLOCK_BYTES = 16 << 20


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True, file_order: np.ndarray | None = None,
                chunk_images: int = 4096, shuffle_window: int = 4) -> np.ndarray:
    """The order in which particle rows are visited in ``epoch`` (a function of seed and epoch only)."""
    base = np.arange(n, dtype=np.int64) if file_order is None else np.asarray(file_order, dtype=np.int64)
    if not shuffle:
        return base.copy()
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    n_chunks = max(1, -(-n // chunk_images))
    chunks = [base[i * chunk_images:(i + 1) * chunk_images] for i in range(n_chunks)]
    perm = rng.permutation(n_chunks)
    out = []
    for g in range(0, n_chunks, shuffle_window):
        group = np.concatenate([chunks[c] for c in perm[g:g + shuffle_window]])
        out.append(group[rng.permutation(len(group))])
    return np.concatenate(out)


def shard_batches(order: np.ndarray, global_batch: int, rank: int = 0, world: int = 1,
                  drop_last: bool = True) -> list[np.ndarray]:
    """Cut ``order`` into global batches and keep rank ``rank``'s equal share of each.

    With ``drop_last`` the last incomplete global batch is left out (the shuffle moves different
    particles there each epoch); otherwise it is cut as evenly as possible (ranks may differ by one).
    """
    if global_batch % world:
        raise ValueError(f"the global batch size {global_batch} must be a multiple of the number of ranks {world}")
    n = len(order)
    n_full = n // global_batch
    per = global_batch // world
    out = [order[b * global_batch + rank * per: b * global_batch + (rank + 1) * per] for b in range(n_full)]
    rest = order[n_full * global_batch:]
    if len(rest) and (not drop_last or n_full == 0):
        out.append(np.array_split(rest, world)[rank])
    return out


@dataclass
class Batch:
    """One batch: particle rows, their float32 images (B, box, box) and whatever a transform adds.

    ``read``: which rows' images were read (a mask: ``images`` holds those rows only), None when all were."""

    rows: np.ndarray
    images: torch.Tensor
    data: dict[str, Any] = field(default_factory=dict)
    read: np.ndarray | None = None


class _Stop:
    pass


class BatchStream:
    """Iterate over batches of particle rows with images read and prepared in a background thread.

    ``transform(batch) -> batch`` runs in that thread (torch releases the GIL in its kernels, so
    preparing the next batches overlaps training on the current one). ``prefetch`` batches wait in its queue;
    0 reads and transforms in the consumer's thread instead (no thread: for passes whose own work is light,
    where a second thread only adds its memory). Reads are grouped into blocks of
    about ``chunk_images`` images so that consecutive batches share mapped windows (None: as many as fit in
    ``BLOCK_BYTES``; a block is held twice, as the reader's scratch and as the block buffer).
    ``needs_read(rows) -> mask``: only the rows it marks are read (the others are cached by the transform;
    ``Batch.read`` says which); None: every row.
    """

    def __init__(self, reader: ImageReader, batches: Sequence[np.ndarray],
                 transform: Callable[[Batch], Batch] | None = None, prefetch: int = 4,
                 chunk_images: int | None = None, needs_read: Callable[[np.ndarray], np.ndarray] | None = None):
        self.reader = reader
        self.needs_read = needs_read
        self.batches = list(batches)
        self.transform = transform
        self.prefetch = max(0, int(prefetch))
        if chunk_images is None:
            chunk_images = BLOCK_BYTES // (4 * reader.box * reader.box)
        self.chunk_images = max(1, int(chunk_images))

    def __len__(self) -> int:
        return len(self.batches)

    def _blocks(self) -> Iterator[list[np.ndarray]]:
        block: list[np.ndarray] = []
        size = 0
        for b in self.batches:
            block.append(b)
            size += len(b)
            if size >= self.chunk_images:
                yield block
                block, size = [], 0
        if block:
            yield block

    def _items(self) -> Iterator[Batch]:
        """The batches, read block by block (and transformed), in order."""
        buf = None
        for block in self._blocks():
            rows = np.concatenate(block)
            mask = None if self.needs_read is None else np.asarray(self.needs_read(rows), dtype=bool)
            take = rows if mask is None else rows[mask]
            if buf is None or len(buf) < len(take):
                buf = np.empty((len(take), self.reader.box, self.reader.box), dtype=np.float32)
            # one reused block buffer
            images = self.reader.read(take, out=buf[:len(take)]) if len(take) else buf[:0]
            start = pos = 0
            for b in block:
                m = None if mask is None else mask[pos:pos + len(b)]
                pos += len(b)
                k = len(b) if m is None else int(m.sum())
                img = torch.from_numpy(images[start:start + k])
                start += k
                if self.transform is None:
                    yield Batch(b, img.clone(), read=m)  # the block buffer is reused: hand out a copy
                else:
                    yield self.transform(Batch(b, img, read=m))
            del images

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._items():
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)
            return
        q.put(_Stop())

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch == 0:
            yield from self._items()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(q, stop), daemon=True, name="cryohet-loader")
        worker.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, _Stop):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()
