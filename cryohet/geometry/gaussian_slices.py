"""Analytic central slices of isotropic Gaussian atoms: F_V(Aᵀk) without building a map.

A Gaussian of weight w (electrons), width sigma_A, at r (Å, relative to the box centre) has the transform
w·exp(-2π²σ²|k|²)·exp(-2πi k·r) (k in 1/Å). Divided by apix³ it is on the scale of ``fft3c`` of the map that
``geometry.gaussians.gaussian_map`` renders (density per Å³ sampled per voxel); with ``voxel_integrated`` the
sinc of that renderer's per-voxel integration is applied too, and with ``lowpass_A`` its raised-cosine low-pass,
so that below the resolution the slices are those of ``Projector(gaussian_map(...)).slice_points`` (tested).

Conventions are ``geometry.project``'s: for RELION rotations A, the 2-D frequency (kx, ky) samples the 3-D point
k3_j = Σ_i A[i, j] k_i; transforms are centred, so a shift s (Å) of the content multiplies them by exp(-2πi k·s).
"""
from __future__ import annotations

import math

import torch


def slice_frequencies_A(A: torch.Tensor, kxy: torch.Tensor, apix: float) -> torch.Tensor:
    """3-D frequencies (B, M, 3) in 1/Å, (x, y, z), of the 2-D frequencies ``kxy`` (M, 2) cycles/pixel on the
    central slices of RELION rotations ``A`` (B, 3, 3)."""
    return torch.einsum("mi,bij->bmj", kxy.to(A.dtype), A[:, :2, :]) / apix


def raised_cosine_lowpass(k_A: torch.Tensor, resolution_A: float, width_A_inv: float) -> torch.Tensor:
    """``gaussians.lowpass_map``'s filter at frequency magnitudes ``k_A`` (1/Å): 1 below 1/resolution_A −
    width/2, 0 above 1/resolution_A + width/2, a raised cosine between."""
    w = torch.clamp((1.0 / resolution_A + width_A_inv / 2 - k_A) / width_A_inv, 0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * w)


def gaussian_slices(A: torch.Tensor, xyz_A: torch.Tensor, weights: torch.Tensor, sigma_A: float,
                    kxy: torch.Tensor, apix: float, *, box: int | None = None, voxel_integrated: bool = True,
                    lowpass_A: float | None = None, chunk_atoms: int = 256) -> torch.Tensor:
    """Central slices (B, M, 2) (real, imaginary) of Gaussian atoms, differentiable in the positions and weights.

    ``A``: (B, 3, 3) RELION rotations; ``xyz_A``: (N, 3) or per image (B, N, 3) positions in Å (x, y, z)
    relative to the box centre; ``weights``: (N,) electrons; ``sigma_A``: Gaussian standard deviation in Å;
    ``kxy``: (M, 2) image frequencies, cycles/pixel (``Points.kxy``); ``apix``: Å/pixel. ``box`` (pixels) is
    needed only for ``lowpass_A`` (the filter's edge is 1.5 Fourier shells of that box). Atoms are summed in
    chunks of ``chunk_atoms`` so that memory is B·M·chunk_atoms, whatever the number of atoms.
    """
    k3 = slice_frequencies_A(A, kxy, apix)                                   # (B, M, 3) 1/Å
    k2 = (k3 ** 2).sum(-1)
    envelope = torch.exp(-2.0 * math.pi ** 2 * sigma_A ** 2 * k2) / apix ** 3
    if voxel_integrated:
        envelope = envelope * torch.sinc(k3 * apix).prod(-1)
    if lowpass_A is not None:
        if box is None:
            raise ValueError("the low-pass needs the box")
        envelope = envelope * raised_cosine_lowpass(torch.sqrt(k2), lowpass_A, 1.5 / (box * apix))
    xyz = xyz_A.to(A.dtype)
    w = weights.to(A.dtype)
    re = torch.zeros(k3.shape[:2], dtype=A.dtype, device=A.device)
    im = torch.zeros_like(re)
    for s in range(0, xyz.shape[-2], chunk_atoms):
        p = xyz[..., s:s + chunk_atoms, :]
        # phase (B, M, n) = 2π k·r
        phase = 2.0 * math.pi * (k3 @ p.transpose(-1, -2) if p.ndim == 3 else k3 @ p.T)
        ww = w[s:s + chunk_atoms]
        re = re + torch.cos(phase) @ ww
        im = im - torch.sin(phase) @ ww
    return torch.stack([re * envelope, im * envelope], -1)


def shift_phase(kxy: torch.Tensor, shift_A: torch.Tensor, apix: float) -> torch.Tensor:
    """(B, M, 2) cos/sin parts of exp(-2πi k·s): moving images' content by ``shift_A`` (B, 2) Å (x, y)."""
    ph = -2.0 * math.pi * (shift_A @ kxy.to(shift_A.dtype).T) / apix
    return torch.stack([torch.cos(ph), torch.sin(ph)], -1)


def complex_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of (..., 2) real/imaginary pairs."""
    return torch.stack([a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
                        a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]], -1)
