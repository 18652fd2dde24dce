"""Prepared particle transforms cached in float16: filled as the first epoch uses them, served to later epochs.

What is cached is :meth:`~cryohet.data.prepare.ImagePreparer.transforms`' output for each particle row: the
windowed, Fourier-cropped transform with the particle's origin undone and divided by the data scale, at the
preparer's pixels, before the CTF (applied per batch), stored as float16 real and imaginary halves, each row
scaled so that its largest value is ``ROW_PEAK`` (its float32 factor kept beside it: a bright outlier cannot
overflow float16, and float16's relative precision, 2^-11, holds for every value). There is no
pass before the first step: the loader asks :meth:`PreparedCache.missing` which rows of a block it must still
read, and :class:`CachedPreparer` stores the rows it prepares. Every batch, the first epoch's included, is served
from the cache (rounded to float16), so a run's inputs do not depend on whether its rows were cached already: a
resumed run retraces an uninterrupted one. Rows are keys (particle-file order), so any shuffled order is served.

Where: in memory when the planned size fits ``MEMORY_SHARE`` of the host's available memory (``auto``), else a
memory-mapped file in the run folder (or ``cache_dir``). The file is filled under a temporary name and renamed
only when every row is in it; its name carries a fingerprint of the particles (stack files, rows, origins) and of
the preparation (boxes, pixel sizes, pixels kept, window, scale), so a stale cache is never read.
Pose refinement does not invalidate it: the corrections are applied to the prepared transforms by the model.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from cryohet.atomic import remove_temporaries, temporary_beside
from cryohet.data.loader import Batch
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.device import free_memory_bytes, refuse_unless_fits
from cryohet.io.reader import ImageReader

CACHE_MODES = ("auto", "memory", "disk", "off")
#: share of the host's available memory an in-memory cache may take under ``auto``
MEMORY_SHARE = 0.25
#: share of the cache folder's free disk space a cache file may take
DISK_SHARE = 0.9
PREFIX = "prepared_cache-"
#: a row's largest stored value (float16 holds up to 65504 and keeps full precision down to 6e-5)
ROW_PEAK = 2.0 ** 14


def fingerprint(reader: ImageReader, prep: ImagePreparer) -> str:
    """A hash of what the cached transforms depend on: the stacks (path, size, time), the rows' images, origins,
    boxes, pixel sizes, kept pixels, window and data scale."""
    h = hashlib.sha256()
    for lay in reader.layouts:
        st = os.stat(lay.path)
        h.update(f"{Path(lay.path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{lay.offset}|{lay.dtype}|".encode())
    for arr in (reader.stack_id, reader.stack_index, prep.shift_A):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(f"{prep.raw.box}|{prep.raw.apix!r}|{prep.lattice.box}|{prep.lattice.apix!r}|{prep.scale!r}".encode())
    if prep.points is not None:
        h.update(prep.points.flat.cpu().numpy().astype(np.int64).tobytes())
    if prep.window is not None:
        h.update(prep.window.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def row_shape(prep: ImagePreparer) -> tuple[int, ...]:
    """The shape of one particle's cached values: (M, 2) at the preparer's pixels, or (n, n, 2) grids."""
    if prep.points is not None:
        return (len(prep.points), 2)
    return (prep.lattice.box, prep.lattice.box, 2)


def planned_bytes(n: int, prep: ImagePreparer) -> int:
    """Bytes of a cache of ``n`` particles: float16 values and a float32 factor per row."""
    return n * (2 * int(np.prod(row_shape(prep))) + 4)


def _mapped(path: Path, n: int, shape: tuple[int, ...], mode: str) -> tuple[np.memmap, np.memmap]:
    """The file's float16 values (n, *shape) and, after them, its float32 row factors (n,)."""
    values = np.memmap(path, np.float16, mode, shape=(n, *shape))
    return values, np.memmap(path, np.float32, mode, offset=values.nbytes, shape=(n,))


class PreparedCache:
    """Float16 prepared transforms by particle row (``values``, times the float32 ``factors``); ``path``: the file
    when on disk (None: in memory), ``tmp``: the temporary name it is filled under."""

    def __init__(self, values: np.ndarray, factors: np.ndarray, filled: np.ndarray, path: Path | None = None,
                 tmp: Path | None = None, log: logging.Logger | None = None):
        self.values, self.factors, self.filled, self.path, self.tmp = values, factors, filled, path, tmp
        self.log = log or logging.getLogger("cryohet")
        self.n_left = int((~filled).sum())

    @property
    def where(self) -> str:
        return "memory" if self.path is None else str(self.path)

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` are not cached yet (boolean mask)."""
        return ~self.filled[rows]

    def put(self, rows: np.ndarray, transforms: torch.Tensor) -> None:
        """Store complex ``transforms`` (len(rows), ...) of ``rows``; the file takes its final name when full."""
        x = torch.view_as_real(transforms.detach().cpu()).numpy()
        peak = np.abs(x).reshape(len(rows), -1).max(1)
        factor = np.where(peak > 0, peak / ROW_PEAK, 1.0).astype(np.float32)
        self.values[rows] = (x / factor.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float16)
        self.factors[rows] = factor
        fresh = ~self.filled[rows]
        self.filled[rows] = True
        self.n_left -= int(fresh.sum())
        if self.n_left == 0 and self.tmp is not None:
            self.values.flush()
            self.factors.flush()
            os.replace(self.tmp, self.path)  # complete: only now under its final name
            self.tmp = None
            self.log.info("prepared-image cache complete: %s", self.path)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        """The cached transforms of ``rows`` (all cached), complex64."""
        x = self.values[rows].astype(np.float32)
        x *= self.factors[rows].reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.view_as_complex(torch.from_numpy(x))

    def close(self, remove: bool) -> None:
        """Unmap; an unfinished file is deleted, and a finished one too when ``remove``."""
        for arr in (self.values, self.factors):
            if isinstance(arr, np.memmap):
                arr._mmap.close()
        self.values = self.factors = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        elif remove and self.path is not None:
            self.path.unlink(missing_ok=True)


def open_cache(mode: str, reader: ImageReader, prep: ImagePreparer, run_dir: Path, cache_dir: Path | None,
               log: logging.Logger, ranks: int = 1, reserved_bytes: int = 0) -> PreparedCache | None:
    """The cache asked for by ``mode`` (auto, memory, disk, off), or None (logged with the reason).

    A complete file of the same fingerprint in the cache folder is reused; in the run folder (no ``cache_dir``),
    caches of other fingerprints (stale) and the temporaries of killed runs are removed. ``memory`` refuses
    (InputError) a cache larger than 80 % of the available memory. With several ``ranks`` each keeps its own
    cache in memory (one file would have several writers), or none when it does not fit a quarter of the
    available memory."""
    if mode not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; known: {', '.join(CACHE_MODES)}")
    if mode == "off":
        return None
    n, shape = len(reader), row_shape(prep)
    need = planned_bytes(n, prep)
    folder = Path(cache_dir) if cache_dir else Path(run_dir)
    key = fingerprint(reader, prep)
    path = folder / f"{PREFIX}{key}.f16"
    fits = need <= MEMORY_SHARE * max(0, free_memory_bytes("cpu") - reserved_bytes)
    if ranks > 1 and mode != "memory":
        if not fits:
            log.warning("prepared-image cache off: %d ranks would write one file, and %.3f GB per rank is more than "
                        "a quarter of the available memory", ranks, need / 1e9)
            return None
        mode = "memory"
    if mode == "auto":
        mode = "disk" if path.exists() or not fits else "memory"
    if mode == "memory":
        per_row = need / max(n, 1)
        refuse_unless_fits(need + reserved_bytes, "cpu", 0.8, reader.layouts[0].path,
                           f"the prepared-image cache in memory, with the run's {reserved_bytes / 1e9:.3f} GB planned,",
                           lambda usable: f"{max(0, int((usable - reserved_bytes) // per_row))} particles",
                           "use --cache disk (or auto)")
        log.info("prepared-image cache: %.3f GB in memory (float16, %d particles); with the run's plan %.3f GB of "
                 "the host's memory", need / 1e9, n, (need + reserved_bytes) / 1e9)
        return PreparedCache(np.empty((n, *shape), np.float16), np.empty(n, np.float32), np.zeros(n, bool),
                             log=log)
    folder.mkdir(parents=True, exist_ok=True)
    if not cache_dir:  # a shared cache folder may hold other runs' caches, and files being filled
        for old in folder.glob(f"{PREFIX}*.f16"):
            if old != path:
                old.unlink(missing_ok=True)
        remove_temporaries(path)
    if path.exists() and path.stat().st_size == need:
        log.info("prepared-image cache: reusing %s", path)
        return PreparedCache(*_mapped(path, n, shape, "r"), np.ones(n, bool), path, log=log)
    free = shutil.disk_usage(folder).free
    if need > DISK_SHARE * free:
        log.warning("prepared-image cache off: it needs %.3f GB and %s has %.3f GB free", need / 1e9, folder,
                    free / 1e9)
        return None
    tmp = temporary_beside(path, ".f16")
    log.info("prepared-image cache: %.3f GB on disk in %s (float16, filled during the first epoch)", need / 1e9,
             folder)
    with open(tmp, "r+b") as fh:
        fh.truncate(need)
    return PreparedCache(*_mapped(tmp, n, shape, "r+"), np.zeros(n, bool), path, tmp, log)


class CachedPreparer:
    """An :class:`ImagePreparer` whose transforms come from ``cache``: rows the loader read are prepared and
    stored first (``Batch.read`` marks them), then every row is served from the cache."""

    def __init__(self, prep: ImagePreparer, cache: PreparedCache):
        self.prep, self.cache = prep, cache

    def __call__(self, batch: Batch) -> ImageBatch:
        rows = np.asarray(batch.rows)
        read = rows if batch.read is None else rows[batch.read]
        if len(read):
            self.cache.put(read, self.prep.transforms(batch.images, read))
        F = self.cache.get(rows).to(self.prep.device)
        return ImageBatch(rows, F, self.prep.ctf(rows), self.prep.rotations(rows))
