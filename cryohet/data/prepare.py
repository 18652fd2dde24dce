"""One preparation of particle images for every method: read -> window -> FFT -> crop -> undo origins -> CTF -> poses.

An :class:`ImagePreparer` turns a loader :class:`~cryohet.data.loader.Batch` (particle rows and their images) into
an :class:`ImageBatch`: centred transforms on a working lattice (Fourier-cropped with
:func:`~cryohet.geometry.lattice.crop_transforms`, so maps keep one intensity scale), moved back by their origins
(RELION's sign, ``undo_origin``), the CTF on the same pixels, and the RELION rotation matrices. It runs in the
loader's background thread (``BatchStream(..., transform=preparer)``), on the CPU or on ``device``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryohet.data.loader import Batch, ImageReader
from cryohet.errors import InputError
from cryohet.geometry.ctf import ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.fourier import fft2c
from cryohet.geometry.lattice import Lattice, Points, crop_transforms
from cryohet.geometry.shift import undo_origin


@dataclass
class ImageBatch:
    """Prepared particles: ``images_ft`` and ``ctf`` are (B, M) at the preparer's points, or (B, n, n) grids."""

    rows: np.ndarray             # particle rows (0-based, particle-file order)
    images_ft: torch.Tensor      # complex64 centred transforms, origins undone, divided by the preparer's scale
    ctf: torch.Tensor            # float32
    rotations: torch.Tensor      # (B, 3, 3) float32 RELION matrices A


def soft_circle(box: int, radius_frac: float) -> torch.Tensor | None:
    """cryoDRGN's real-space window: 1 inside radius_frac·box/2, cosine fall-off to 0.99·box/2 (None for 0)."""
    if radius_frac <= 0:
        return None
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) / (box / 2)
    r_out = max(0.99, radius_frac + 1e-3)
    t = ((r - radius_frac) / (r_out - radius_frac)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class ImagePreparer:
    """Particle images of ``particles`` (a ParticleSet: box, apix, euler_deg, shift_A, ctf) -> :class:`ImageBatch`.

    ``lattice``: the working lattice (the particles' box or a Fourier crop of it); ``points``: the pixels kept
    (None: whole grids); ``window_radius``: soft real-space circle before the FFT, fraction of box/2 (0: none);
    ``scale``: transforms are divided by it (a data scale for neural models).
    """

    def __init__(self, particles: Any, lattice: Lattice, points: Points | None = None, window_radius: float = 0.0,
                 scale: float = 1.0, device: torch.device | str = "cpu"):
        self.raw = Lattice(int(particles.box), float(particles.apix))
        if lattice.box > self.raw.box:
            raise InputError(getattr(particles, "source", None),
                             f"the working box {lattice.box} px is larger than the images ({self.raw.box} px)")
        self.lattice = lattice
        self.points = points
        self.device = torch.device(device)
        self.window = soft_circle(self.raw.box, window_radius)
        if self.window is not None:
            self.window = self.window.to(self.device)
        self.euler = np.asarray(particles.euler_deg, dtype=np.float64)
        self.shift_A = np.asarray(particles.shift_A, dtype=np.float64)
        self.ctf_params = particles.ctf
        self.scale = float(scale)

    def transforms(self, images: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Centred, windowed, cropped, origin-corrected transforms (B, M) or (B, n, n), complex64."""
        img = images.to(self.device, torch.float32)
        if self.window is not None:
            img = img * self.window
        F = crop_transforms(fft2c(img), self.lattice.box)
        origin_px = torch.as_tensor(self.shift_A[rows] / self.lattice.apix, device=self.device)
        F = undo_origin(F, origin_px).to(torch.complex64)
        if self.points is not None:
            F = self.points.take(F)
        return F / self.scale if self.scale != 1.0 else F

    def ctf(self, rows: np.ndarray) -> torch.Tensor:
        c = ctf_2d(self.ctf_params.take(rows), self.lattice.box, self.lattice.apix, device=self.device)
        c = c.to(torch.float32)
        return self.points.take(c) if self.points is not None else c

    def rotations(self, rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(euler_to_matrix(self.euler[rows]), dtype=torch.float32, device=self.device)

    def __call__(self, batch: Batch) -> ImageBatch:
        rows = np.asarray(batch.rows)
        return ImageBatch(rows, self.transforms(batch.images, rows), self.ctf(rows), self.rotations(rows))


def transform_rms(reader: ImageReader, prep: ImagePreparer, n_sample: int, seed: int) -> float:
    """RMS of the prepared transforms over a fixed sample of particles (a data scale); InputError when zero."""
    n = len(reader)
    rows = sample_rows(n, n_sample, seed, 0xDA7A)
    acc, count = 0.0, 0
    for s in range(0, len(rows), 256):
        r = rows[s:s + 256]
        F = prep.transforms(torch.from_numpy(reader.read(r)), r)
        acc += float((F.abs() ** 2).sum())
        count += F.numel()
    rms = math.sqrt(acc / max(count, 1)) * prep.scale
    if not rms > 0 or not math.isfinite(rms):
        raise InputError(reader.layouts[0].path, "the particle images are empty (all zero) inside the resolution "
                                                 "circle")
    return rms


def sample_rows(n: int, n_sample: int, seed: int, stream: int) -> np.ndarray:
    """A fixed sample (sorted) of at most ``n_sample`` of ``n`` particle rows, drawn from (``seed``, ``stream``)."""
    return np.sort(np.random.default_rng([seed, stream]).permutation(n)[:min(n, n_sample)])


def prepared_sample(reader: ImageReader, prep: ImagePreparer, n_sample: int, seed: int, stream: int,
                    batch: int = 64) -> Iterator[ImageBatch]:
    """The images of ``sample_rows(len(reader), n_sample, seed, stream)`` prepared by ``prep``, ``batch`` at a
    time (to estimate a scale or a weight once, before a fit)."""
    rows = sample_rows(len(reader), n_sample, seed, stream)
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        yield prep(Batch(r, torch.from_numpy(reader.read(r))))
