"""Reading particle images from MRC stacks by particle row: memory-mapped windows, unmapped after each read.

This is the one reader of particle images: the streaming loader (``cryohet.data.loader``) and
``ParticleSet.images`` both use it.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        """Images of particle ``rows`` (any order) -> float32 (len(rows), box, box), into ``out`` if given.

        Raises InputError naming the stack and image when an image holds NaN or infinite values.
        """
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
        finite = np.isfinite(out).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            b = int(np.flatnonzero(~finite)[0])
            raise InputError(self.layouts[int(self.stack_id[rows[b]])].path,
                             f"image {int(self.stack_index[rows[b]]) + 1} (particle {int(rows[b])}) holds NaN or "
                             "infinite values")
        return out
