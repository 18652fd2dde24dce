"""MRC / MRCS maps and image stacks through mrcfile: checked headers, memory-mapped stacks, atomic writes.

Real files bend the MRC2014 rules (RELION writes stacks without the 'MAP ' id, some maps have a voxel size of 0
or odd dimensions), so headers are read in permissive mode and then checked here against the file size, with
an ``InputError`` naming the file and the problem when they do not add up.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError

HEADER_BYTES = 1024
# MRC modes we read as real images: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16
REAL_MODES = {0, 1, 2, 6, 12}
_MAX_DIM = 1 << 20


class MrcHeaderInfo:
    """What a checked header says: shape (nz, ny, nx), dtype, data offset, voxel size (Å, may be 0)."""

    def __init__(self, path: Path, nx: int, ny: int, nz: int, dtype: np.dtype, offset: int,
                 voxel_A: tuple[float, float, float], axis_order: tuple[int, int, int]):
        self.path, self.nx, self.ny, self.nz = path, nx, ny, nz
        self.dtype, self.offset, self.voxel_A, self.axis_order = dtype, offset, voxel_A, axis_order

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.nz, self.ny, self.nx


def read_header(path: str | os.PathLike) -> MrcHeaderInfo:
    """Read and check an MRC header: file exists, header readable, real mode, sizes agree with the file size."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "is not a regular file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(path, f"not an MRC file: {size} bytes, shorter than the {HEADER_BYTES}-byte MRC header")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
                h = m.header.copy()
    except Exception as e:  # mrcfile raises ValueError and others on garbage
        raise InputError(path, f"unreadable MRC header ({e})") from e
    nx, ny, nz, mode, nsymbt = (int(h.nx), int(h.ny), int(h.nz), int(h.mode), int(h.nsymbt))
    if not (0 < nx < _MAX_DIM and 0 < ny < _MAX_DIM and 0 < nz < _MAX_DIM * 64):
        raise InputError(path, f"corrupt MRC header: dimensions nx={nx}, ny={ny}, nz={nz}")
    if mode not in REAL_MODES:
        raise InputError(path, f"corrupt or unsupported MRC header: mode {mode} (supported: "
                               f"{sorted(REAL_MODES)}, real-valued data)")
    if nsymbt < 0 or nsymbt > size:
        raise InputError(path, f"corrupt MRC header: extended header size {nsymbt} bytes")
    dtype = mrcfile.utils.data_dtype_from_header(h)
    offset = HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise InputError(path, f"truncated MRC file: header says {nz} x {ny} x {nx} values of {dtype.name} "
                               f"({expected} bytes with the header) but the file has only {size} bytes")
    if size > expected:
        raise InputError(path, f"corrupt MRC file: {size - expected} bytes more than its header describes "
                               f"({nz} x {ny} x {nx} values of {dtype.name})")
    voxel = tuple(float(v) for v in (h.cella.x / h.mx if h.mx else 0.0, h.cella.y / h.my if h.my else 0.0,
                                     h.cella.z / h.mz if h.mz else 0.0))
    order = (int(h.mapc), int(h.mapr), int(h.maps))
    if sorted(order) != [1, 2, 3]:
        order = (1, 2, 3)  # many writers leave these 0; the MRC default is columns=x, rows=y, sections=z
    return MrcHeaderInfo(path, nx, ny, nz, dtype, offset, voxel, order)


def _memmap(info: MrcHeaderInfo) -> np.memmap:
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)


def read_map(path: str | os.PathLike, allow_noncubic: bool = False) -> tuple[np.ndarray, float]:
    """Read a 3-D map as float32 ``(z, y, x)`` and its voxel size in Å (0.0 when the header has none).

    Non-cubic maps (e.g. a 16 x 16 x 128 file that is really a stack of images) are refused unless
    ``allow_noncubic``; anisotropic voxel sizes are refused.
    """
    info = read_header(path)
    data = np.asarray(_memmap(info))
    # axis order: data axes are (sections, rows, columns) = (maps, mapr, mapc); bring them to (z, y, x)
    mapc, mapr, maps = info.axis_order
    sec_row_col = [maps, mapr, mapc]
    if sec_row_col != [3, 2, 1]:
        data = np.transpose(data, [sec_row_col.index(3), sec_row_col.index(2), sec_row_col.index(1)])
    vol = np.array(data, dtype=np.float32, order="C")  # a copy: writable, and the file is not kept mapped
    if not allow_noncubic and len(set(vol.shape)) != 1:
        nz, ny, nx = vol.shape
        raise InputError(path, f"map is not a cube: {nx} x {ny} x {nz} voxels (x, y, z); a cubic map is needed"
                               + (" (nz is a multiple of nx: this may be a stack of images, not a map)"
                                  if nx == ny and nz % nx == 0 else ""))
    vx, vy, vz = info.voxel_A
    nonzero = [v for v in (vx, vy, vz) if v > 0]
    if nonzero and (max(nonzero) - min(nonzero)) > 1e-3 * max(nonzero):
        raise InputError(path, f"anisotropic voxel size {vx:g} x {vy:g} x {vz:g} Å is not supported")
    if not np.isfinite(vol).all():
        raise InputError(path, "map holds NaN or infinite values")
    return vol, float(vx)


def read_map_like(path: str | os.PathLike, box: int, apix: float, what: str = "--mask") -> np.ndarray:
    """A map that must match the particles: ``box`` px cubed at ``apix`` Å/px (within 1 %), finite; InputError
    naming ``path`` and ``what`` (the parameter) otherwise."""
    arr, map_apix = read_map(path)
    if arr.shape != (box,) * 3:
        raise InputError(path, f"{what} has shape {arr.shape} but the particles' box is {box} px: "
                               f"it must be a ({box}, {box}, {box}) map")
    if map_apix and abs(map_apix - apix) > 1e-2 * apix:
        raise InputError(path, f"{what} has {map_apix:.4f} Å/px but the particles {apix:.4f} Å/px")
    if not np.isfinite(arr).all():
        raise InputError(path, f"{what} holds NaN/inf values")
    return arr


def read_mask(path: str | os.PathLike, box: int, apix: float, what: str = "--mask") -> np.ndarray:
    """A mask matching the particles (see ``read_map_like``), scaled to [0, 1]; InputError when it is empty."""
    mask = read_map_like(path, box, apix, what)
    if mask.max() <= 0:
        raise InputError(path, f"{what} is empty (no voxel above 0)")
    return np.clip(mask / mask.max(), 0, 1) if mask.max() > 1 else np.clip(mask, 0, 1)


def _write_mrc(path: str | os.PathLike, arr: np.ndarray, apix: float, stack: bool,
               origin_A: np.ndarray | None = None) -> None:
    what = "write_stack needs an array (n, y, x)" if stack else "write_map needs a 3-D array (z, y, x)"
    if arr.ndim != 3:
        raise ValueError(f"{what}, got shape {arr.shape}")
    if not apix > 0:
        raise ValueError(f"{what.split()[0]} needs a positive pixel size, got {apix}")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(arr, dtype=np.float32))
        if stack:
            m.set_image_stack()
        else:
            m.set_volume()
        m.voxel_size = float(apix)
        if origin_A is not None:
            m.header.origin = tuple(float(v) for v in origin_A)
        m.update_header_stats()


def write_map(path: str | os.PathLike, array: np.ndarray, apix: float, origin_A: np.ndarray | None = None) -> None:
    """Write a 3-D float32 map ``(z, y, x)`` with voxel size ``apix`` Å, atomically; ``origin_A`` (x, y, z): where
    voxel 0 lies in Å (the header's origin, which ChimeraX honours and RELION ignores; default 0)."""
    _write_mrc(path, np.asarray(array), apix, stack=False, origin_A=origin_A)


def open_stack(path: str | os.PathLike) -> np.memmap:
    """Memory-map an image stack read-only as ``(n, y, x)`` (a single 2-D image gives n = 1).

    Checks that the file exists, the header is sane, the data size matches the header and images are square.
    """
    info = read_header(path)
    if info.nx != info.ny:
        raise InputError(path, f"images are not square: {info.nx} x {info.ny} pixels (x, y)")
    return _memmap(info)


def stack_apix(path: str | os.PathLike) -> float:
    """Pixel size in Å from the header of a stack (0.0 when the header has none)."""
    return read_header(path).voxel_A[0]


def write_stack(path: str | os.PathLike, array: np.ndarray, apix: float) -> None:
    """Write images ``(n, y, x)`` (or one 2-D image) as a float32 MRC stack with pixel size ``apix`` Å, atomically."""
    arr = np.asarray(array)
    _write_mrc(path, arr[None] if arr.ndim == 2 else arr, apix, stack=True)
