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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.io.mrc import read_header

#: Largest index gap (images) still read through one memory-mapped window.
_MAX_GAP = 256


@dataclass(frozen=True)
class StackLayout:
    """Where the images of one stack lie in its file."""

    path: Path
    offset: int          # bytes before the first image
    dtype: np.dtype
    n: int
    box: int

    @property
    def image_bytes(self) -> int:
        return self.box * self.box * self.dtype.itemsize


def stack_layout(path: str | Path) -> StackLayout:
    """Read and check an MRC stack header (square images) -> its layout."""
    info = read_header(path)
    if info.nx != info.ny:
        raise InputError(path, f"images are not square: {info.nx} x {info.ny} pixels (x, y)")
    return StackLayout(Path(path), int(info.offset), np.dtype(info.dtype), int(info.nz), int(info.nx))


class ImageReader:
    """Reads particle images (float32) from MRC stacks by particle row.

    ``stack_id[i]`` picks the stack in ``stack_paths`` and ``stack_index[i]`` (0-based) the image in it.
    Each :meth:`read` maps the needed windows of the files and unmaps them before returning.
    """

    def __init__(self, stack_paths: Sequence[str | Path], stack_id: np.ndarray, stack_index: np.ndarray):
        self.layouts = [stack_layout(p) for p in stack_paths]
        boxes = {lay.box for lay in self.layouts}
        if len(boxes) != 1:
            raise InputError(self.layouts[0].path, f"stacks hold images of different sizes: {sorted(boxes)}")
        self.box = boxes.pop()
        self.stack_id = np.asarray(stack_id, dtype=np.int64)
        self.stack_index = np.asarray(stack_index, dtype=np.int64)
        if self.stack_id.shape != self.stack_index.shape or self.stack_id.ndim != 1:
            raise ValueError("stack_id and stack_index must be 1-D arrays of one length")
        for s, lay in enumerate(self.layouts):
            sel = self.stack_index[self.stack_id == s]
            if len(sel) and (sel.min() < 0 or sel.max() >= lay.n):
                raise InputError(lay.path, f"particles refer to image {int(sel.max()) + 1} (1-based) "
                                           f"but the stack holds {lay.n} images")
        if len(self.stack_id) and (self.stack_id.min() < 0 or self.stack_id.max() >= len(self.layouts)):
            raise ValueError("stack_id refers to a stack that is not listed")
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.stack_id)

    def file_order(self) -> np.ndarray:
        """Particle rows sorted by (stack, image index): the order of the bytes on disk."""
        return np.lexsort((self.stack_index, self.stack_id))

    def _scratch(self, n: int) -> np.ndarray:
        """A per-thread buffer reused between reads (no allocation churn, which fragments the heap)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = np.empty((max(n, 64), self.box, self.box), dtype=np.float32)
            self._local.buf = buf
        return buf[:n]

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images of particle ``rows`` (any order) -> float32 (len(rows), box, box), into ``out`` if given."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        sid, sidx = self.stack_id[rows], self.stack_index[rows]
        order = np.lexsort((sidx, sid))
        sid_o, sidx_o = sid[order], sidx[order]
        scratch = self._scratch(len(rows))
        # runs of one stack whose consecutive indices are close: one mapped window each
        brk = np.flatnonzero((np.diff(sid_o) != 0) | (np.diff(sidx_o) > _MAX_GAP)) + 1
        for a, b in zip(np.r_[0, brk], np.r_[brk, len(order)]):
            if a == b:
                continue
            lay = self.layouts[int(sid_o[a])]
            lo, hi = int(sidx_o[a]), int(sidx_o[b - 1]) + 1
            mm = np.memmap(lay.path, dtype=lay.dtype, mode="r", offset=lay.offset + lo * lay.image_bytes,
                           shape=(hi - lo, lay.box, lay.box))
            np.take(mm, sidx_o[a:b] - lo, axis=0, out=scratch[a:b])
            del mm  # unmapped now: its pages leave this process's resident set
        out[order] = scratch
        return out


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
    """One batch: particle rows, their float32 images (B, box, box) and whatever a transform adds."""

    rows: np.ndarray
    images: torch.Tensor
    data: dict[str, Any] = field(default_factory=dict)


class _Stop:
    pass


class BatchStream:
    """Iterate over batches of particle rows with images read and prepared in a background thread.

    ``transform(batch) -> batch`` runs in that thread (torch releases the GIL in its kernels, so
    preparing the next batches overlaps training on the current one). Reads are grouped into blocks of
    about ``chunk_images`` images so that consecutive batches share mapped windows.
    ``crop_box`` Fourier-crops the images on the fly (pixel size grows by box / crop_box).
    """

    def __init__(self, reader: ImageReader, batches: Sequence[np.ndarray],
                 transform: Callable[[Batch], Batch] | None = None, prefetch: int = 4,
                 chunk_images: int = 4096, crop_box: int | None = None):
        self.reader = reader
        self.batches = list(batches)
        self.transform = transform
        self.prefetch = max(1, int(prefetch))
        self.chunk_images = max(1, int(chunk_images))
        self.crop_box = crop_box

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

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        from cryohet.geometry.fourier import fourier_crop_2d

        try:
            buf = None
            for block in self._blocks():
                rows = np.concatenate(block)
                if buf is None or len(buf) < len(rows):
                    buf = np.empty((len(rows), self.reader.box, self.reader.box), dtype=np.float32)
                images = self.reader.read(rows, out=buf[:len(rows)])  # one reused block buffer
                start = 0
                for b in block:
                    img = torch.from_numpy(images[start:start + len(b)])
                    start += len(b)
                    if self.crop_box and self.crop_box != img.shape[-1]:
                        img = fourier_crop_2d(img, self.crop_box).to(torch.float32)
                    elif self.transform is None:
                        img = img.clone()  # the block buffer is reused: hand out a copy
                    batch = Batch(b, img)
                    if self.transform is not None:
                        batch = self.transform(batch)
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                del images
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)
            return
        q.put(_Stop())

    def __iter__(self) -> Iterator[Batch]:
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


def reader_for(pset: Any) -> ImageReader:
    """An :class:`ImageReader` over the stacks of a ``cryohet.io.particles.ParticleSet``."""
    return ImageReader(pset.stack_paths, pset.stack_id, pset.stack_index)
