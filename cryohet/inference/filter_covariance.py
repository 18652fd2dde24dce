"""The pose-aware encoder's filters from the particles' covariance (``train-vae --filters_from covariance``).

Each image's residual (the image less the homogeneous map's CTF-weighted slice at its pose) is spread onto the
filters' Fourier grid by the filter bank's adjoint (a CTF-weighted back-projection, b_i), and the filters are the
leading eigenvectors of Σ̂ = S (Σ_i b_i b_iᵀ) S, S = 1 / (D + f·D̄), D = Σ_i of the back-projected CTF² per
voxel, D̄ its mean over the voxel's Fourier shell: the outer products of the back-projections, each voxel divided
by how much of the data reaches it. The floor f·D̄ (f = ``DENSITY_FLOOR``) leaves uniform views' weights as
1 / D up to a constant, but keeps voxels that few views reach (preferred orientations, a missing cone) from being
amplified until their noise makes the leading eigenvectors. Σ̂ is a one-pass
stand-in for the covariance of the conformations that ``moments`` and ``principal-volumes`` solve for; its
eigenvectors, held fixed, give the encoder the directions in which the particles differ, which at low SNR the
learnt filters do not find. The eigenvectors are found by subspace iteration, each step one streamed pass over
a random subset of at most ``COVARIANCE_PARTICLES`` particles, so neither time nor memory grows beyond it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from cryohet.inference.pose_filters import PoseFilterBank

#: the most particles the covariance is estimated from
COVARIANCE_PARTICLES = 10_000
#: passes over them (subspace iteration steps)
POWER_PASSES = 5
#: extra vectors iterated beside the K wanted (oversampling)
OVERSAMPLE = 8
#: the density's floor, as a fraction of its mean over each Fourier shell (Wiener-like: S = 1 / (D + f·D̄))
DENSITY_FLOOR = 1.0

Signals = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def covariance_filters(bank: PoseFilterBank, signals: Callable[[], Signals], n_filters: int,
                       reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, seed: int = 0,
                       passes: int = POWER_PASSES) -> torch.Tensor:
    """(2·n_voxels, ``n_filters``) the leading eigenvectors of the density-normalised covariance of the
    back-projected signals, as the bank's ``values`` (real parts, then imaginary parts), inside the bank's
    resolution circle, each of unit RMS and with its largest real part positive (the sign is arbitrary).

    ``signals()``: one pass over the particles, (rotations (B, 3, 3), CTF (B, M), residual (B, M, 2)) per batch;
    ``reduce``: sums a tensor over the ranks that share the passes (each streams its own particles). The first
    pass also sums the density, so the iteration proper starts with the second (``passes`` ≥ 2)."""
    if passes < 2:
        raise ValueError(f"passes must be at least 2, got {passes}")
    nv = bank.n_voxels
    device = bank.values.device
    inside = (bank.voxel_radii() <= bank.max_freq * bank.box + 1e-6).to(device)
    width = min(2 * int(inside.sum()), n_filters + OVERSAMPLE)
    if not 1 <= n_filters <= width:
        raise ValueError(f"{n_filters} filters asked for, the resolution circle holds {int(inside.sum())} voxels")
    q = torch.randn(2 * nv, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    scale = None
    for step in range(passes):
        y = torch.zeros(2 * nv, width, dtype=torch.float64, device=device)
        density = torch.zeros(nv, dtype=torch.float64, device=device) if scale is None else None
        probe = q if scale is None else scale[:, None] * q
        for rot, ctf, residual in signals():
            b = bank.adjoint(rot, ctf, residual)
            y += (b.T @ (b @ probe.float())).double()
            if density is not None:
                density += bank.adjoint(rot, ctf, torch.stack([ctf, torch.zeros_like(ctf)], -1)).sum(0)[:nv].double()
        y = reduce(y)
        if scale is None:
            scale = _density_weights(bank, reduce(density).abs(), inside).repeat(2)
        y = scale[:, None] * y
        if step == passes - 1:
            values, vectors = torch.linalg.eigh(q.T @ y)  # Rayleigh–Ritz in the last subspace
            u = q @ vectors[:, values.argsort(descending=True)[:n_filters]]
        else:
            q = torch.linalg.qr(y).Q
    u = u * inside.repeat(2)[:, None]  # the QR's rounding leaves ~1e-15 where the rows were zero
    u = u / u.pow(2).mean(0).sqrt().clamp_min(1e-30)
    real = u[:nv]  # F(k) and F(−k) have equal real parts, so a tie of magnitudes there is no tie of signs
    sign = torch.sign(real.gather(0, real.abs().argmax(0, keepdim=True)))
    return (u * sign).float()


def _density_weights(bank: PoseFilterBank, density: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(n_voxels,) S = 1 / (D + f·D̄) inside the resolution circle, 0 outside: D the back-projected CTF² of each
    voxel, D̄ its mean over the voxels inside the circle in the same Fourier shell (radius rounded to a voxel)."""
    shell = bank.voxel_radii().round().long().to(density.device)
    n_shells = int(shell.max()) + 1
    total = torch.zeros(n_shells, dtype=density.dtype, device=density.device).index_add_(
        0, shell[inside], density[inside])
    count = torch.bincount(shell[inside], minlength=n_shells).clamp_min(1)
    floored = density + DENSITY_FLOOR * (total / count)[shell]
    return torch.where(inside, 1.0 / floored.clamp_min(1e-6 * float(density.max())), 0.0)
