"""Central slices of Gaussian atoms by splatting: rotate, spread onto a fine 2-D grid, one FFT, sample.

The analytic slices of ``geometry.gaussian_slices`` cost B·N·M (every atom at every frequency). Here each
image's atoms are rotated (a RELION rotation A puts the point r at (A r)_xy in the image), spread with bilinear
weights onto a periodic grid of ``box · oversample`` pixels of ``apix / oversample`` Å (the image's field of
view, so the grid's frequencies are the image lattice's), transformed once, and the lattice frequencies ``kxy``
are read off. Dividing by the spreading kernel's transform (sinc² per axis) and multiplying by the atoms' common
envelope (``gaussian_slices.slice_envelope``: Gaussian, voxel sinc, low-pass) gives the same slices up to the
aliasing of the bilinear kernel, which falls with ``oversample`` (measured in docs/benchmarks.md). Cost
O(B·N + B·(box·oversample)² log box). Differentiable in positions (through the bilinear weights, piecewise
linear in the positions) and weights.
"""
from __future__ import annotations

import torch

from cryohet.geometry.gaussian_slices import slice_envelope, slice_frequencies_A

#: default oversampling of the splatting grid (accuracy and cost in docs/benchmarks.md)
OVERSAMPLE = 2


def lattice_indices(kxy: torch.Tensor, box: int) -> torch.Tensor:
    """Integer lattice indices (M, 2) (x, y) of frequencies ``kxy`` (M, 2) cycles/pixel of a ``box`` lattice;
    ValueError when they are not on it."""
    m = kxy.double() * box
    mi = torch.round(m)
    if (m - mi).abs().max() > 1e-3:
        raise ValueError(f"splatting samples only the image lattice: frequencies must be multiples of 1/{box}")
    return mi.long()


def splat_slices(A: torch.Tensor, xyz_A: torch.Tensor, weights: torch.Tensor, sigma_A: float, kxy: torch.Tensor,
                 apix: float, *, box: int | None = None, voxel_integrated: bool = True, lowpass_A: float | None = None,
                 oversample: int = OVERSAMPLE) -> torch.Tensor:
    """Central slices (B, M, 2) (real, imaginary) of Gaussian atoms: ``gaussian_slices``' arguments and result.

    ``A``: (B, 3, 3) RELION rotations; ``xyz_A``: (N, 3) or (B, N, 3) positions in Å (x, y, z) from the box
    centre; ``weights``: (N,) electrons; ``sigma_A``: width in Å; ``kxy``: (M, 2) lattice frequencies in
    cycles/pixel of the ``box``-pixel image (required here); ``oversample``: the grid's pixels per image pixel.
    Memory B·(box·oversample)² complex values. Single precision (the grid's phases are exact integers).
    """
    if box is None:
        raise ValueError("splatting needs the image box")
    with torch.autocast(A.device.type, enabled=False):
        dtype = torch.promote_types(A.dtype, torch.float32)
        A, xyz, w, kxy = A.to(dtype), xyz_A.to(dtype), weights.to(dtype), kxy.to(dtype)
        grid_ft = _splat_ft(A, xyz, w, box * oversample, apix / oversample)
        m = lattice_indices(kxy, box).to(A.device)
        n = box * oversample
        sampled = grid_ft[:, m[:, 1] % n, m[:, 0] % n]                           # (B, M) complex
        kernel = (torch.sinc(m.to(dtype) / n) ** 2).prod(-1)                      # bilinear spreading's transform
        envelope = slice_envelope(slice_frequencies_A(A, kxy, apix), sigma_A, apix, box, voxel_integrated,
                                  lowpass_A)
        sampled = sampled * (envelope / kernel)
        return torch.stack([sampled.real, sampled.imag], -1)


def _splat_ft(A: torch.Tensor, xyz: torch.Tensor, w: torch.Tensor, n: int, step_A: float) -> torch.Tensor:
    """2-D DFTs (B, n, n) (index (ky, kx), zero frequency at 0) of the atoms spread with bilinear weights onto a
    periodic n × n grid of ``step_A`` Å whose index 0 is the image centre."""
    B = A.shape[0]
    uv = xyz @ A[:, :2, :].transpose(1, 2) / step_A                             # (B, N, 2) grid units (x, y)
    base = torch.floor(uv.detach())
    frac = uv - base
    i0 = base.long() % n
    i1 = (i0 + 1) % n
    fx, fy = frac[..., 0], frac[..., 1]
    offset = (torch.arange(B, device=A.device) * n * n)[:, None]
    idx = torch.cat([offset + iy[..., 1] * n + ix[..., 0] for iy in (i0, i1) for ix in (i0, i1)], 1)
    wy0, wy1 = (1 - fy) * w, fy * w
    vals = torch.cat([wy0 * (1 - fx), wy0 * fx, wy1 * (1 - fx), wy1 * fx], 1)
    grid = torch.zeros(B * n * n, dtype=A.dtype, device=A.device).index_add(0, idx.reshape(-1), vals.reshape(-1))
    return torch.fft.fft2(grid.reshape(B, n, n))
