"""Fourier-slice projection of a map with RELION's conventions (padding, trilinear interpolation)."""
from __future__ import annotations

import torch

from cryohet.geometry.fourier import centered_coords, fft3c, ifft2c
from cryohet.geometry.shift import apply_origin


def sinc2_grid(box: int, pad_box: int, device=None) -> torch.Tensor:
    """Separable sinc²(x / pad_box) on a (box,)*3 real-space grid: the trilinear-interpolation kernel's transform."""
    c = centered_coords(box, device, torch.float64) / pad_box
    s = torch.sinc(c) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(torch.float32)


def slice_coords(A: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """3-D padded-grid positions (B, box, box, 3) as (x, y, z) of the central slices Aᵀ (kx, ky, 0)."""
    k = centered_coords(box, A.device, A.dtype)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    plane = torch.stack([kx, ky], -1)  # (box, box, 2)
    # position_j = sum_i A[i, j] k_i for i in (x, y)
    return pad * torch.einsum("hwi,bij->bhwj", plane, A[:, :2, :])


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
        P = self.pad_box
        ft = torch.zeros((P + 1,) * 3, dtype=torch.complex64, device=volume.device)
        ft[:P, :P, :P] = fft3c(padded)
        self._ft = ft.flatten()  # ((P + 1)³,) indexed (z · (P + 1) + y) · (P + 1) + x; the planes at P are zero
        Q = P + 1
        #: flat offsets of the 8 corners of a trilinear cell, in the order (z, y, x) of ``sample``'s weights
        self._offsets = torch.tensor([dz * Q * Q + dy * Q + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                                     device=volume.device)
        r = centered_coords(self.box, volume.device)
        self._inside = (r[:, None] ** 2 + r[None, :] ** 2) <= (self.box // 2) ** 2

    @property
    def device(self) -> torch.device:
        return self._ft.device

    def sample(self, pos: torch.Tensor) -> torch.Tensor:
        """The padded transform at positions ``pos`` (..., 3) = (x, y, z) in padded-grid units from its centre, by
        trilinear interpolation (zero outside the grid, as ``grid_sample``'s zero padding): one gather of the 8
        corners from the transform stored with one more (zero) plane per axis."""
        Q = self.pad_box + 1
        u = (pos.to(torch.float32) + self.pad_box // 2).clamp_(0, Q - 1 - 1e-4)
        base = torch.floor(u)
        f = u - base
        b = base.long()
        idx = ((b[..., 2] * Q + b[..., 1]) * Q + b[..., 0]).unsqueeze(-1) + self._offsets   # (..., 8)
        wx = torch.stack([1 - f[..., 0], f[..., 0]], -1)
        wy = torch.stack([1 - f[..., 1], f[..., 1]], -1)
        wz = torch.stack([1 - f[..., 2], f[..., 2]], -1)
        w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(-3)
        return (self._ft[idx] * w).sum(-1)

    def slice(self, A: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) RELION matrices -> (B, box, box) complex: F_V(Aᵀ k), zero beyond Nyquist."""
        pos = slice_coords(A.to(self.device, torch.float32), self.box, self.pad)
        return self.sample(pos) * self._inside

    def slice_points(self, A: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """F_V(Aᵀ k) (B, M) at the 2-D frequencies ``kxy`` (M, 2) in cycles/pixel (``Points.kxy``): the slice at
        only the pixels a method uses (a half-plane inside a resolution circle is under half of the box)."""
        k = kxy.to(self.device, torch.float32) * self.box
        pos = self.pad * torch.einsum("mi,bij->bmj", k, A.to(self.device, torch.float32)[:, :2, :])
        return self.sample(pos)

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


def project(volume: torch.Tensor, A: torch.Tensor, shift_px: torch.Tensor | None = None,
            ctf: torch.Tensor | None = None, pad: int = 2) -> torch.Tensor:
    """One-off projection of ``volume``; build a ``Projector`` to project one map many times."""
    return Projector(volume, pad).project(A, shift_px, ctf)
