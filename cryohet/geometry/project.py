"""Fourier-slice projection of a map with RELION's conventions (padding, trilinear interpolation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cryohet.geometry.fourier import centered_coords, fft3c, ifft2c
from cryohet.geometry.shift import apply_origin


def sinc2_grid(box: int, pad_box: int, device=None) -> torch.Tensor:
    """Separable sinc²(x / pad_box) on a (box,)*3 real-space grid: the trilinear-interpolation kernel's transform."""
    c = centered_coords(box, device, torch.float64) / pad_box
    s = torch.sinc(c) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(torch.float32)


def plane_coords(k: torch.Tensor, A: torch.Tensor, pad: int) -> torch.Tensor:
    """3-D padded-grid positions (B, ..., 3) as (x, y, z) of the central-slice points Aᵀ (kx, ky, 0) for the 2-D
    frequencies ``k`` (..., 2) in pixels of the unpadded Fourier grid (kx, ky) and rotations A (B, 3, 3)."""
    # position_j = pad Σ_i A[i, j] k_i for i in (x, y)
    return pad * torch.einsum("...i,bij->b...j", k, A[:, :2, :])


def slice_coords(A: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """3-D padded-grid positions (B, box, box, 3) as (x, y, z) of the central slices Aᵀ (kx, ky, 0)."""
    k = centered_coords(box, A.device, A.dtype)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return plane_coords(torch.stack([kx, ky], -1), A, pad)


class Projector:
    """Holds the padded 3-D transform of a map; ``slice(A)`` gives centred 2-D transforms of its projections."""

    def __init__(self, volume: torch.Tensor, pad: int = 2):
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"projection needs a cubic map, got shape {tuple(volume.shape)}")
        self.box = volume.shape[-1]
        self.pad = pad
        self.pad_box = pad * self.box
        v = volume.to(torch.float32) / sinc2_grid(self.box, self.pad_box, volume.device)
        lo = self.pad_box // 2 - self.box // 2
        padded = torch.zeros((self.pad_box,) * 3, dtype=torch.float32, device=volume.device)
        padded[lo:lo + self.box, lo:lo + self.box, lo:lo + self.box] = v
        ft = fft3c(padded)
        self._ft = torch.stack([ft.real, ft.imag])[None]  # (1, 2, P, P, P) for grid_sample
        r = centered_coords(self.box, volume.device)
        self._inside = (r[:, None] ** 2 + r[None, :] ** 2) <= (self.box // 2) ** 2

    @property
    def device(self) -> torch.device:
        return self._ft.device

    def sample(self, pos: torch.Tensor) -> torch.Tensor:
        """The padded transform at positions ``pos`` (..., 3) = (x, y, z) in padded-grid units from its centre, by
        trilinear interpolation (zero outside the grid)."""
        return _sample(self._ft, pos, self.pad_box)[0]

    def slice(self, A: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) RELION matrices -> (B, box, box) complex: F_V(Aᵀ k), zero beyond Nyquist."""
        pos = slice_coords(A.to(self.device, torch.float32), self.box, self.pad)
        return self.sample(pos) * self._inside

    def slice_points(self, A: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """F_V(Aᵀ k) (B, M) at the 2-D frequencies ``kxy`` (M, 2) in cycles/pixel (``Points.kxy``): the slice at
        only the pixels a method uses (a half-plane inside a resolution circle is under half of the box)."""
        k = kxy.to(self.device, torch.float32) * self.box
        return self.sample(plane_coords(k, A.to(self.device, torch.float32), self.pad))

    def project(self, A: torch.Tensor, shift_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Particle images (B, box, box): projection times ``ctf`` (centred, (B, box, box)), moved by the origin.

        ``shift_px`` is the RELION origin (rlnOriginX/YAngst / apix); the content moves by −origin, exactly
        as relion_project makes images (correlation > 0.999 image by image in tests/test_geometry_relion.py).
        """
        Fs = self.slice(A)
        if ctf is not None:
            Fs = Fs * ctf.to(self.device)
        if shift_px is not None:
            Fs = apply_origin(Fs, shift_px)
        return ifft2c(Fs).real


def _sample(ft: torch.Tensor, pos: torch.Tensor, pad_box: int) -> torch.Tensor:
    """Padded transforms ``ft`` (1, 2K, P, P, P) (real and imaginary parts of K maps) at positions ``pos`` (..., 3)
    in padded-grid units from the centre -> (K, ...) complex, by trilinear interpolation (zero outside)."""
    P = pad_box
    grid = (pos.to(ft.device, torch.float32).reshape(1, -1, 1, 1, 3) + P // 2) / (P - 1) * 2 - 1
    out = F.grid_sample(ft, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(-1, 2, *pos.shape[:-1])  # align_corners=True: index i at -1 + 2i / (P - 1)
    return torch.complex(out[:, 0], out[:, 1])


class ProjectorStack:
    """Several maps of one box sliced at the same positions in one interpolation pass (each map a pair of
    channels of one ``grid_sample``): the slices of every map at a particle's pose at the cost of about one."""

    def __init__(self, volumes: torch.Tensor, pad: int = 2):
        if volumes.ndim != 4:
            raise ValueError(f"a stack of maps must be (K, box, box, box), got shape {tuple(volumes.shape)}")
        projectors = [Projector(v, pad) for v in volumes]
        self.box, self.pad, self.pad_box = projectors[0].box, pad, projectors[0].pad_box
        self._ft = torch.cat([p._ft for p in projectors], 1)  # (1, 2K, P, P, P)

    def __len__(self) -> int:
        return self._ft.shape[1] // 2

    def slice_points(self, A: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """F_Vk(Aᵀ k) (K, B, M) of every map k at the 2-D frequencies ``kxy`` (M, 2) in cycles/pixel."""
        k = kxy.to(self._ft.device, torch.float32) * self.box
        return _sample(self._ft, plane_coords(k, A.to(self._ft.device, torch.float32), self.pad), self.pad_box)


def project(volume: torch.Tensor, A: torch.Tensor, shift_px: torch.Tensor | None = None,
            ctf: torch.Tensor | None = None, pad: int = 2) -> torch.Tensor:
    """One-off projection of ``volume``; build a ``Projector`` to project one map many times."""
    return Projector(volume, pad).project(A, shift_px, ctf)
