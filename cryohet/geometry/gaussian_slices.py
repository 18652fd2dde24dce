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
    chunks of ``chunk_atoms`` so that memory is B·M·chunk_atoms, whatever the number of atoms. Computed in
    ``A``'s precision (at least float32) even under autocast: phases of many radians need it.
    """
    with torch.autocast(A.device.type, enabled=False):
        dtype = torch.promote_types(A.dtype, torch.float32)
        return _slices(A.to(dtype), xyz_A.to(dtype), weights.to(dtype), sigma_A, kxy.to(dtype), apix, box,
                       voxel_integrated, lowpass_A, chunk_atoms)


def slice_envelope(k3: torch.Tensor, sigma_A: float, apix: float, box: int | None, voxel_integrated: bool,
                   lowpass_A: float | None) -> torch.Tensor:
    """The factor (B, M) common to every atom at 3-D frequencies ``k3`` (B, M, 3) 1/Å: the Gaussian's transform
    divided by apix³, with the voxel-integration sinc and the low-pass of ``gaussian_map`` when asked for."""
    k2 = (k3 ** 2).sum(-1)
    envelope = torch.exp(-2.0 * math.pi ** 2 * sigma_A ** 2 * k2) / apix ** 3
    if voxel_integrated:
        envelope = envelope * torch.sinc(k3 * apix).prod(-1)
    if lowpass_A is not None:
        if box is None:
            raise ValueError("the low-pass needs the box")
        envelope = envelope * raised_cosine_lowpass(torch.sqrt(k2), lowpass_A, 1.5 / (box * apix))
    return envelope


def _slices(A: torch.Tensor, xyz: torch.Tensor, w: torch.Tensor, sigma_A: float, kxy: torch.Tensor, apix: float,
            box: int | None, voxel_integrated: bool, lowpass_A: float | None, chunk_atoms: int) -> torch.Tensor:
    k3 = slice_frequencies_A(A, kxy, apix)                                   # (B, M, 3) 1/Å
    envelope = slice_envelope(k3, sigma_A, apix, box, voxel_integrated, lowpass_A)
    k3_rad = 2.0 * math.pi * k3
    re = torch.zeros(k3.shape[:2], dtype=A.dtype, device=A.device)
    im = torch.zeros_like(re)
    for s in range(0, xyz.shape[-2], chunk_atoms):
        cre, cim = _PhaseSum.apply(k3_rad, xyz[..., s:s + chunk_atoms, :], w[s:s + chunk_atoms])
        re, im = re + cre, im + cim
    return torch.stack([re * envelope, im * envelope], -1)


class _PhaseSum(torch.autograd.Function):
    """(Σ_n w_n cos φ, −Σ_n w_n sin φ) with φ[b, m, n] = q[b, m]·r[(b,) n] (q in radians per Å), each (B, M).

    The backward pass is four batched matrix products with the saved cos φ and sin φ (no elementwise pass over the
    (B, M, n) phases, which is what autograd's would make): ∂/∂r = −w Σ_m (g_re sin φ + g_im cos φ) q, and ∂/∂q
    likewise over the atoms."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rt = r.transpose(-1, -2)                                   # (B, 3, n) or (3, n)
        phase = q @ rt                                             # (B, M, n)
        cos, sin = torch.cos(phase), torch.sin(phase)
        ctx.save_for_backward(q, r, w, cos, sin)
        return cos @ w, -(sin @ w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_re: torch.Tensor, g_im: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, r, w, cos, sin = ctx.saved_tensors
        # ∂L/∂φ[b, m, n] = −w_n (g_re[b, m] sin φ + g_im[b, m] cos φ)
        grad_q = grad_r = grad_w = None
        if ctx.needs_input_grad[1]:
            gq_re = (g_re[..., None] * q).transpose(1, 2)          # (B, 3, M)
            gq_im = (g_im[..., None] * q).transpose(1, 2)
            per_image = -(gq_re @ sin + gq_im @ cos).transpose(1, 2) * w[:, None]   # (B, n, 3)
            grad_r = per_image if r.ndim == 3 else per_image.sum(0)
        if ctx.needs_input_grad[0]:
            wr = w[:, None] * r                                    # (B, n, 3) or (n, 3)
            grad_q = -(g_re[..., None] * (sin @ wr) + g_im[..., None] * (cos @ wr))
        if ctx.needs_input_grad[2]:
            grad_w = torch.einsum("bm,bmn->n", g_re, cos) - torch.einsum("bm,bmn->n", g_im, sin)
        return grad_q, grad_r, grad_w


def shift_phase(kxy: torch.Tensor, shift_A: torch.Tensor, apix: float) -> torch.Tensor:
    """(B, M, 2) cos/sin parts of exp(-2πi k·s): moving images' content by ``shift_A`` (B, 2) Å (x, y)."""
    ph = -2.0 * math.pi * (shift_A @ kxy.to(shift_A.dtype).T) / apix
    return torch.stack([torch.cos(ph), torch.sin(ph)], -1)


def complex_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of (..., 2) real/imaginary pairs."""
    return torch.stack([a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
                        a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]], -1)
