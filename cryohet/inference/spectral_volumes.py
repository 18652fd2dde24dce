"""Laplacian spectral volumes (Moscovich, Halevi, Andén & Singer 2020; survey section 5).

The map of particle i is expanded in the first eigenfunctions of the graph Laplacian of the particles' latents,

    V_i = Σ_k X_k ψ_k(z_i),   ψ_0 = 1,

so that maps vary smoothly along the conformational manifold whatever its shape. The eigenfunctions are the
coordinates of a density-free diffusion map (``inference.diffusion``) of the whitened latents of at most
``max_points`` landmark particles, extended to every particle and to any latent point by Nyström. With the ψ known,
the coefficient maps X_k solve a linear least-squares problem in Fourier space — the M-step of principal volumes
with the coordinates fixed (``inference.ppca.MapEquations``): per voxel a (K+1)×(K+1) system accumulated over all
images with their poses and CTFs, for each half-set apart, then each coefficient map weighted per shell by its
half-set FSC (:func:`fit_spectral_volumes`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from cryohet.geometry.fourier import centered_coords
from cryohet.geometry.lattice import Lattice, box_for_resolution
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import slice_coords
from cryohet.inference.diffusion import DiffusionMap, diffusion_map, nystrom
from cryohet.inference.ppca import ImageSource, MapEquations, fourier_pad_3d, solve_maps
from cryohet.reconstruct.fsc import fsc_weighted_average

Progress = Callable[[Iterable, str, int], Iterable]


@dataclass
class SpectralBasis:
    """Laplacian eigenfunctions of latents, evaluable at any latent point."""

    landmarks: np.ndarray     # (L, d) whitened latents of the landmark particles
    mean: np.ndarray          # (d,) whitening
    scale: np.ndarray         # (d,)
    dm: DiffusionMap
    d2: np.ndarray            # (L, L) squared distances between the landmarks

    @property
    def n_basis(self) -> int:
        """Number of functions, ψ_0 = 1 included."""
        return self.dm.coords.shape[1] + 1

    def __call__(self, z: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """(M, K + 1): 1, ψ_1(z), ..., ψ_K(z) at latents ``z`` (M, d)."""
        w = (np.atleast_2d(np.asarray(z, np.float64)) - self.mean) / self.scale
        out = np.ones((len(w), self.n_basis))
        for s in range(0, len(w), chunk):
            d2 = ((w[s:s + chunk, None, :] - self.landmarks[None]) ** 2).sum(-1)
            out[s:s + chunk, 1:] = nystrom(d2, self.dm, self.d2)
        return out


def laplacian_basis(z: np.ndarray, n_functions: int, k_neighbours: int = 10, max_points: int = 3000,
                    seed: int = 0) -> SpectralBasis:
    """The first ``n_functions`` non-constant Laplacian eigenfunctions of latents ``z`` (N, d)."""
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    mean, scale = z.mean(0), z.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    rows = np.arange(len(z))
    if len(z) > max_points:
        rows = np.sort(np.random.default_rng([seed, 0x5BEC]).choice(len(z), max_points, replace=False))
    land = (z[rows] - mean) / scale
    d2 = ((land[:, None, :] - land[None]) ** 2).sum(-1)
    return SpectralBasis(land, mean, scale, diffusion_map(d2, n_functions, k_neighbours=k_neighbours), d2)


@dataclass
class SpectralVolumes:
    maps: np.ndarray          # (K + 1, box, box, box) float32 coefficient maps X_k at the particles' box
    fsc: np.ndarray           # (K + 1, box // 2 + 1) FSC of each coefficient map between the half-sets
    apix: float
    basis: SpectralBasis
    resolution_A: float

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps (M, box, box, box) at latents ``z`` (M, d)."""
        return np.einsum("mk,kxyz->mxyz", self.basis(z), self.maps).astype(np.float32)


def fit_spectral_volumes(pset, z: np.ndarray, n_functions: int, half: np.ndarray, *, resolution_A: float = 0.0,
                         k_neighbours: int = 10, pad: int = 2, batch_size: int = 256,
                         device: torch.device | str = "cpu", seed: int = 0,
                         progress: Progress | None = None) -> SpectralVolumes:
    """Spectral volumes of ``pset`` (particles with poses and CTF) on the graph of their latents ``z`` (N, d).

    The least-squares coefficient maps of the two half-sets (``half``: 1 or 2 per particle) are solved apart, each
    coefficient map is their mean weighted per shell by their FSC (``reconstruct.fsc.fsc_weighted_average``), so a
    function the data do not support fades out instead of adding noise."""
    device = torch.device(device)
    track = progress or (lambda items, desc, total: items)
    basis = laplacian_basis(z, n_functions, k_neighbours, seed=seed)
    psi = torch.as_tensor(basis(z), dtype=torch.float64, device=device)          # (N, J)
    J = psi.shape[1]
    N_box, apix = int(pset.box), float(pset.apix)
    lattice = Lattice(N_box, apix).cropped(box_for_resolution(N_box, apix, resolution_A))
    n = lattice.box
    radius_px = n // 2 - 1 if resolution_A <= 0 else min(n // 2 - 1, n * lattice.apix / resolution_A)
    src = ImageSource(pset, lattice, radius_px, batch_size, device, cache_mb=0.0)
    c3 = centered_coords(pad * n, device, torch.float64) / pad
    limit = ((c3[:, None, None] ** 2 + c3[None, :, None] ** 2 + c3[None, None, :] ** 2) <= radius_px ** 2).double()
    accs = [MapEquations(n, pad, radius_px, J, device) for _ in (1, 2)]
    omega = torch.ones(src.npix, dtype=torch.float32, device=device)   # white noise: the fixed ψ make ω cancel
    half_t = torch.as_tensor(np.asarray(half), device=device)
    for b in track(src.batches(), "spectral volumes", src.n_batches()):
        rows = torch.as_tensor(b.rows, device=device)
        zt = psi[rows]
        pos = slice_coords(b.rotations, n, pad).reshape(len(b.rows), -1, 3)[:, src.flat]
        for h, acc in zip((1, 2), accs, strict=True):
            sel = torch.nonzero(half_t[rows] == h).squeeze(1)
            if len(sel):
                acc.insert(pos[sel], 0.5 * src.weight, b.images_ft[sel], b.ctf[sel], omega, zt[sel],
                           zt[sel, :, None] * zt[sel, None, :])
    sphere = sphere_mask(n, n / 2 - 3.0, 3.0, device=device)   # as relion_reconstruct: nothing outside the box's sphere
    halves = [solve_maps(acc, radius_px, limit, None) * sphere for acc in accs]
    del accs
    maps, curves = [], []
    for k in range(J):
        avg, curve = fsc_weighted_average(*(fourier_pad_3d(h[k], N_box).cpu() for h in halves))
        maps.append(avg.numpy().astype(np.float32))
        curves.append(curve)
    return SpectralVolumes(np.stack(maps), np.stack(curves), apix, basis, float(n * lattice.apix / radius_px))
