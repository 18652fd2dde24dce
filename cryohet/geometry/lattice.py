"""The Fourier lattice of particle images: one description of cropping, the resolution circle and the half-plane.

Transforms are centred (zero frequency at index ``box // 2``, see ``geometry.fourier``). A real image's transform
is Hermitian, so one half of the plane holds all of it. Every method uses one convention for that half:

    the *half-plane*: ky < 0, or ky = 0 and kx < 0 (plus, where asked for, the zero frequency),

the same as the half-space kz < 0 on which the neural decoder is evaluated. Only the backprojector keeps RELION's
insertion set (the columns kx >= 0, the kx = 0 column whole) to match ``relion_reconstruct`` sample by sample.

Cropping keeps the central ``n × n`` of an ``N × N`` transform and scales it by ``(n / N)³`` (:func:`crop_scale`):
the cropped transforms are then those of projections of the map Fourier-cropped to ``n³`` voxels with its voxel
values kept, so every method writes maps on the scale of a full-box reconstruction whatever the crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryohet.geometry.fourier import centered_coords, central_crop


def crop_scale(box: int, new_box: int) -> float:
    """Factor applied to a transform cropped from ``box`` to ``new_box`` pixels: maps keep their voxel values."""
    return (new_box / box) ** 3


def crop_transforms(F: torch.Tensor, new_box: int) -> torch.Tensor:
    """Centred transforms (..., N, N) -> their central (..., n, n), scaled by :func:`crop_scale`."""
    n_old = F.shape[-1]
    return F if new_box == n_old else central_crop(F, new_box, 2) * crop_scale(n_old, new_box)


def box_for_resolution(box: int, apix: float, resolution_A: float) -> int:
    """Smallest even box whose Nyquist frequency reaches ``1/resolution_A`` (at most ``box``; 0 keeps it)."""
    if resolution_A <= 0:
        return box
    n = 2 * math.ceil(box * apix / resolution_A) + 2
    return int(min(box, max(n, 8)))


@dataclass(frozen=True)
class Points:
    """Pixels of a centred (box, box) transform: flat indices, frequencies and shells."""

    flat: torch.Tensor       # (M,) indices into box * box
    kxy: torch.Tensor        # (M, 2) float32 (kx, ky), cycles/pixel
    shell: torch.Tensor      # (M,) long, rounded radius in pixels
    weight: torch.Tensor     # (M,) float32: 2 for a pixel standing for itself and its mate, 1 for DC

    def __len__(self) -> int:
        return len(self.flat)

    def take(self, grids: torch.Tensor) -> torch.Tensor:
        """Values (B, M) of these pixels from centred grids (B, box, box)."""
        return grids.reshape(grids.shape[0], -1)[:, self.flat.to(grids.device)]


@dataclass(frozen=True)
class Lattice:
    """Centred (box, box) Fourier lattice of images at ``apix`` Å/pixel."""

    box: int
    apix: float

    def __post_init__(self) -> None:
        if self.box % 2 or self.box < 2:
            raise ValueError(f"the box must be even, got {self.box}")

    def cropped(self, new_box: int) -> Lattice:
        """The lattice after Fourier cropping to ``new_box`` (the pixel size grows by box / new_box)."""
        return Lattice(new_box, self.apix * self.box / new_box)

    def half_plane(self, radius_px: float | None = None, dc: bool = False, strict: bool = True) -> Points:
        """The half-plane pixels (ky < 0, or ky = 0 and kx < 0) inside the resolution circle.

        ``radius_px`` defaults to Nyquist (box / 2); ``strict`` keeps |k| < radius (else <=); ``dc`` adds the
        zero frequency (weight 1; every other pixel has weight 2, standing for its Friedel mate too).
        """
        n = self.box
        radius = n / 2 if radius_px is None else float(radius_px)
        c = centered_coords(n, dtype=torch.float64)
        ky, kx = torch.meshgrid(c, c, indexing="ij")
        r = torch.sqrt(kx**2 + ky**2)
        half = (ky < 0) | ((ky == 0) & (kx < 0))
        if dc:
            half = half | ((ky == 0) & (kx == 0))
        inside = r < radius - 1e-9 if strict else r <= radius + 1e-9
        flat = torch.nonzero((half & inside).reshape(-1)).squeeze(1)
        kxy = torch.stack([kx.reshape(-1)[flat], ky.reshape(-1)[flat]], 1) / n
        rr = r.reshape(-1)[flat]
        weight = torch.where(rr == 0, 1.0, 2.0).to(torch.float32)
        return Points(flat, kxy.to(torch.float32), torch.round(rr).long(), weight)
