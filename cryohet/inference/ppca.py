"""Principal volumes from 2-D images with known poses and CTF: probabilistic PCA by EM in Fourier space.

Survey section 5 (Katsevich–Singer, Andén–Singer, Tagare et al.'s PPCA, cryoSPARC's 3D variability).
Image model for particle m (centred transform y_m, origin undone, Fourier-cropped to the resolution limit):

    y_m = c_m · P_m (μ + W z_m) + n_m,      z_m ~ N(0, I_K),   n_m ~ N(0, σ²(shell)) per pixel,

with P_m the Fourier slice at the particle's pose and c_m its CTF.

* μ is the homogeneous reconstruction of the particles at their full box
  (``reconstruct.homogeneous.fsc_weighted_reconstruction``: half-sets, plain division, FSC-weighted per shell),
  held fixed: a mean fitted jointly with the components at the working box lost its high frequencies, and the
  mean of a linear model is the least-squares single map.
* E-step (per particle, a K×K system): Σ_m = (I + Re G_mᴴ Ω G_m)⁻¹, ẑ_m = Σ_m Re G_mᴴ Ω (y_m − c_m P_m μ),
  with G_m = c_m P_m W (slices of each component) and Ω = diag(1/σ²).
* M-step (per Fourier voxel, a K×K system): Σ_m Pᵀ Ω c² E[z zᵀ] W = Σ_m Pᵀ Ω c (y − c P μ) ẑᵀ, accumulated by
  trilinear insertion (the K-channel generalisation of ``BackProjector``), plus a Wiener-like per-shell prior
  1/(T τ²(shell)), τ² the mean's signal power or the components' own.
* σ²(shell) from the expected residuals; the components are masked in real space after each M-step.

Images stream in batches (optionally cached in memory once Fourier-cropped), so memory does not grow
with the number of particles beyond the (N, K) coordinates. Three fits run side by side: all particles, and each
half-set alone (as RELION's gold standard). At the end every particle's coordinates come from a last E-step with
the components of all particles; those are weighted along each principal direction per shell by the FSC between
the half-sets' fits (turned onto them by orthogonal Procrustes) and low-passed where that FSC falls below 0.143,
so a component holds no detail the halves do not agree on, then rotated to orthonormal principal volumes X_k
sorted by variance, with coordinates b_k = S Vᵀ ẑ and their posterior standard deviations.

``mean="joint"`` keeps the estimator as cryoSPARC's 3DVA (μ solved with the components per voxel, a
(K+1)×(K+1) M-step with z̃ = (1, z), one fit of all particles): the coordinates classification starts from.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.errors import InputError
from cryohet.geometry.fourier import centered_coords, fft3c, fourier_crop_3d, ifft3c
from cryohet.geometry.lattice import Lattice, box_for_resolution
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import Projector, sinc2_grid, slice_coords
from cryohet.inference.em_state import EMState, load_state, mask_digest, save_state
from cryohet.inference.memory_plans import PvShape, check_pv_fits
from cryohet.reconstruct.fsc import fsc, fsc_shell_weights, resolution_at, weight_shells
from cryohet.reconstruct.homogeneous import fsc_weighted_reconstruction, particle_halves

#: Fewest particles the estimator accepts, and particles needed per unknown map (mean + K components).
MIN_PARTICLES = 50
PARTICLES_PER_MAP = 20
#: Voxels whose data weight is below this fraction of the mean weight are regularised at least this much.
MIN_WEIGHT_FRACTION = 1e-3
#: The components' prior power per shell is at least this fraction of the mean's (keeps W from exactly 0).
MIN_COMPONENT_POWER = 1e-6
#: Each principal volume is low-passed where the FSC between its half-sets' estimates first falls below this.
COMPONENT_FSC = 0.143

ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]


@dataclass
class PrincipalVolumes:
    """Result of ``fit_principal_volumes``; maps at the particles' box and pixel size."""

    mean: np.ndarray               # (box, box, box) float32, X_0
    components: np.ndarray         # (K, box, box, box) float32, orthonormal X_k, by decreasing variance
    eigenvalues: np.ndarray        # (K,) model variance of b_k (map units² · voxels, as ||X_k|| = 1)
    latents: np.ndarray            # (N, K) posterior means of b_k, rows in particle order
    latent_std: np.ndarray         # (N, K) posterior standard deviations of b_k
    noise_var: np.ndarray          # (shells,) σ² per Fourier shell of the working box
    apix: float                    # Å/pixel of the maps
    work_box: int                  # box the images were Fourier-cropped to
    resolution_A: float            # resolution limit used
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False        # EM met ``tol`` after the warm-up (else it stopped at ``max_iter``)
    last_change: float = math.nan  # sine of the largest principal angle between the last two component subspaces
    tol: float = 0.0               # the stopping tolerance on that sine
    iterations: int = 0            # EM iterations done (a resumed fit counts those before the stop)
    component_fsc: np.ndarray | None = None          # (K, work_box // 2 + 1) FSC of each X_k between half-sets
    component_resolution_A: np.ndarray | None = None  # (K,) where that FSC falls below 0.143, Å
    mean_fsc: np.ndarray | None = None               # (box // 2 + 1,) half-map FSC of the mean (homogeneous map)


def check_inputs(n_particles: int, box: int, apix: float, n_components: int, resolution_A: float,
                 mask: np.ndarray | None, source: str | None = None, mask_source: str | None = None) -> None:
    """Reject inputs the estimator cannot support, naming the parameter (ValueError / InputError)."""
    if n_components < 1:
        raise ValueError(f"--n_components must be at least 1, got {n_components}")
    if n_particles < MIN_PARTICLES:
        raise InputError(source, f"only {n_particles} particles: principal volumes needs at least {MIN_PARTICLES}")
    need = PARTICLES_PER_MAP * (n_components + 1)
    if n_particles < need:
        raise ValueError(f"--n_components {n_components} is more than {n_particles} particles support: "
                         f"K components need at least {PARTICLES_PER_MAP}·(K+1) = {need} particles; "
                         f"use --n_components {max(1, n_particles // PARTICLES_PER_MAP - 1)} or fewer")
    if resolution_A < 0 or (0 < resolution_A < 2 * apix * (1 - 1e-6)):
        raise ValueError(f"--resolution_A {resolution_A} Å is beyond Nyquist ({2 * apix:.3f} Å at "
                         f"{apix:.3f} Å/pixel); use 0 for Nyquist or a larger value")
    if mask is not None and tuple(mask.shape) != (box,) * 3:
        raise InputError(mask_source, f"--mask has shape {tuple(mask.shape)} but the particles' box is "
                                      f"{box}: the mask must be a ({box}, {box}, {box}) map")


def fourier_pad_3d(vol: torch.Tensor, new_box: int) -> torch.Tensor:
    """Upsample a map (n, n, n) to (N, N, N) by zero-padding its centred transform; keeps voxel values."""
    n = vol.shape[-1]
    if n == new_box:
        return vol
    F = fft3c(vol.to(torch.float64))
    out = torch.zeros((new_box,) * 3, dtype=F.dtype, device=F.device)
    lo = new_box // 2 - n // 2
    out[lo:lo + n, lo:lo + n, lo:lo + n] = F
    return (ifft3c(out).real * (new_box / n) ** 3).to(torch.float32)


def band_limit(maps: np.ndarray, apix: float, resolution_A: float) -> np.ndarray:
    """Maps (..., N, N, N) with every Fourier component beyond 1/resolution_A set to zero (hard sphere), as
    the estimator's maps are; ``resolution_A`` <= 0 leaves them as they are."""
    maps = np.asarray(maps, dtype=np.float32)
    if resolution_A <= 0:
        return maps
    N = maps.shape[-1]
    c = centered_coords(N, None, torch.float64) / (N * apix)
    k2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    F = fft3c(torch.as_tensor(maps, dtype=torch.float64)) * (k2 <= 1.0 / resolution_A ** 2)
    return ifft3c(F).real.numpy().astype(np.float32)


class ImageSource:
    """Prepared particles on the half-plane inside the resolution circle (``data.prepare``), cached in memory
    after the first pass when they fit in ``cache_mb``. Sums over the plane are weighted sums over the half."""

    def __init__(self, particles: Any, lattice: Lattice, radius_px: float, batch_size: int, device: torch.device,
                 cache_mb: float):
        self.points = lattice.half_plane(radius_px, dc=True, strict=False)
        self.prep = ImagePreparer(particles, lattice, self.points, device=device)
        self.reader = particles.reader()
        self.shell = self.points.shell.to(device)
        self.n_shells = int(self.shell.max()) + 1
        self.weight = self.points.weight.to(device)        # 2 per pixel (itself and its mate), 1 for DC
        self.flat = self.points.flat.to(device)
        self.npix = len(self.points)
        self.n_particles = len(particles.euler_deg)
        rows = np.arange(self.n_particles)
        self.rows = [rows[s:s + batch_size] for s in range(0, self.n_particles, batch_size)]
        self._cache: list[ImageBatch] | None = None
        self._want_cache = self.n_particles * self.npix * 12 / 2**20 <= cache_mb

    def batches(self, start: int = 0) -> Iterator[ImageBatch]:
        """Prepared batches in particle order from batch ``start`` on (a whole pass reads and, if wanted, caches
        them)."""
        if self._cache is not None:
            yield from self._cache[start:]
            return
        cache: list[ImageBatch] = []
        for b in BatchStream(self.reader, self.rows[start:], self.prep):
            if self._want_cache and start == 0:
                cache.append(b)
            yield b
        if self._want_cache and start == 0:
            self._cache = cache

    def n_batches(self) -> int:
        return len(self.rows)


class MapEquations:
    """Per-voxel normal equations of the M-step on the padded Fourier grid, inside a sphere.

    Channels: Re and Im of Σ ω c y z̃_j (j = 0..K), then Σ ω c² E[z̃_j z̃_l] for j ≤ l, then Σ t² ω c² z̃_j²
    (t the trilinear weight: the noise variance of the data terms, for the moment estimate of the prior).
    Only the Hermitian half of each image is inserted (the DC term at half weight); ``solve`` adds the
    Friedel mates.
    """

    def __init__(self, n: int, pad: int, radius_px: float, n_maps: int, device: torch.device):
        self.n, self.pad, self.P = n, pad, pad * n
        self.J = n_maps
        self.pairs = torch.triu_indices(n_maps, n_maps).to(device)
        self.C = 2 * n_maps + self.pairs.shape[1] + n_maps    # + Σ t² ω c² ẑ_j² (noise of the data terms)
        P = self.P
        c = centered_coords(P, device, torch.float64) / pad
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).flatten()
        # every corner of a pixel's trilinear cell lies within √3 padded voxels of it (pad 1: beyond 1.5)
        keep = r <= radius_px + max(1.5, math.sqrt(3) / pad + 0.01)
        self.lut = torch.full((P ** 3,), -1, dtype=torch.long, device=device)
        self.flat = torch.nonzero(keep).squeeze(1)
        self.lut[self.flat] = torch.arange(len(self.flat), device=device)
        self.shell = torch.round(r[self.flat]).long()      # shell of each kept voxel (unpadded units)
        # Friedel mate of each kept voxel (index i -> (P - i) mod P on each axis)
        z, y, x = self.flat // (P * P), (self.flat // P) % P, self.flat % P
        mate = (((P - z) % P) * P + (P - y) % P) * P + (P - x) % P
        self.mate = self.lut[mate]
        self.mate = torch.where(self.mate >= 0, self.mate, torch.arange(len(self.flat), device=device))
        self.acc = torch.zeros((len(self.flat), self.C), dtype=torch.float32, device=device)
        self.device = device
        self._corners = [((dx, dy, dz), (dz * P + dy) * P + dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]

    def insert(self, pos: torch.Tensor, half_w: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
               omega: torch.Tensor, zt: torch.Tensor, Ezz: torch.Tensor) -> None:
        """Add a batch: padded-grid positions (B, h, 3) of the half-plane pixels and their weights (h,) (1, or ½
        for DC), data y, ctf c (B, h), ω (h,), z̃ (B, J), E[z̃ z̃ᵀ] (B, J, J)."""
        wo = omega * half_w
        wd = (wo * c) * y                                             # (B, h) complex
        dz = wd[..., None] * zt[:, None, :].to(wd.dtype)              # (B, h, J)
        ww = wo * c * c                                               # (B, h)
        Ep = Ezz[:, self.pairs[0], self.pairs[1]].to(torch.float32)   # (B, npairs)
        nv = self.C - self.J
        src = torch.cat([dz.real, dz.imag, ww[..., None] * Ep[:, None, :],
                         ww[..., None] * (zt[:, None, :].to(torch.float32) ** 2)], -1).reshape(-1, self.C)
        pos = (pos + self.P // 2).reshape(-1, 3)
        base = torch.floor(pos).clamp(0, self.P - 2)
        frac = pos - base
        base = base.long()
        flat0 = (base[:, 2] * self.P + base[:, 1]) * self.P + base[:, 0]
        for (dx, dy, dz_), off in self._corners:
            w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                 * (frac[:, 2] if dz_ else 1 - frac[:, 2]))
            wc = torch.cat([w[:, None].expand(-1, nv), (w * w)[:, None].expand(-1, self.J)], 1)
            self.acc.index_add_(0, self.lut[flat0 + off], src * wc)

    def full(self) -> torch.Tensor:
        """Accumulated channels with the Friedel mates added (V, C), float64."""
        a = self.acc.to(torch.float64)
        m = a[self.mate]
        J = self.J
        out = a + m
        out[:, J:2 * J] = a[:, J:2 * J] - m[:, J:2 * J]       # imaginary parts of the data conjugate
        return out

    def solve(self, lam: torch.Tensor, chunk: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve (A(v) + diag λ(v)) X(v) = b(v) per kept voxel; λ (V, J) -> X (J, V) complex128 and the noise
        variance of each X_j(v) (J, V), diag((A+Λ)⁻¹ S (A+Λ)⁻¹) with S = diag(Σ t² ω c² z̃²) per voxel."""
        J, V = self.J, len(self.flat)
        out = torch.zeros((J, V), dtype=torch.complex128, device=self.device)
        var = torch.zeros((J, V), dtype=torch.float64, device=self.device)
        full = self.full()
        npair = self.pairs.shape[1]
        for s in range(0, V, chunk):
            a = full[s:s + chunk]
            M = torch.zeros((len(a), J, J), dtype=torch.float64, device=self.device)
            M[:, self.pairs[0], self.pairs[1]] = a[:, 2 * J:2 * J + npair]
            M[:, self.pairs[1], self.pairs[0]] = a[:, 2 * J:2 * J + npair]
            Minv = torch.linalg.inv(M + torch.diag_embed(lam[s:s + chunk]))
            rhs = torch.complex(a[:, :J], a[:, J:2 * J])               # (v, J)
            out[:, s:s + chunk] = torch.einsum("vjk,vk->vj", Minv.to(torch.complex128), rhs).T
            noise = a[:, 2 * J + npair:]                                # (v, J)
            var[:, s:s + chunk] = torch.einsum("vjk,vk,vjk->vj", Minv, noise, Minv).T
        return out, var

    def to_grid(self, X: torch.Tensor) -> torch.Tensor:
        """Kept-voxel values (J, V) -> padded grids (J, P, P, P)."""
        grid = torch.zeros((X.shape[0], self.P ** 3), dtype=X.dtype, device=self.device)
        grid[:, self.flat] = X
        return grid.reshape(X.shape[0], self.P, self.P, self.P)

    def weight_diag(self) -> torch.Tensor:
        """Σ ω c² E[z̃_j²] per voxel and map, (n_voxels, J)."""
        diag = (self.pairs[0] == self.pairs[1]).nonzero().squeeze(1)
        return self.full()[:, 2 * self.J + diag]


def to_real_space(grid: torch.Tensor, n: int, pad: int, limit: torch.Tensor) -> torch.Tensor:
    """Padded Fourier grids (J, P, P, P) -> maps (J, n, n, n), as ``BackProjector.reconstruct``."""
    P = pad * n
    grid = grid * limit
    vol = ifft3c(grid).real
    lo = P // 2 - n // 2
    vol = vol[:, lo:lo + n, lo:lo + n, lo:lo + n]
    return (vol / sinc2_grid(n, P, grid.device).double()).to(torch.float32)


def _shell_mean(values: torch.Tensor, shell: torch.Tensor, n_sh: int) -> torch.Tensor:
    tot = torch.zeros(n_sh, dtype=torch.float64, device=values.device).index_add_(0, shell, values)
    cnt = torch.zeros(n_sh, dtype=torch.float64, device=values.device).index_add_(0, shell, torch.ones_like(values))
    return tot / cnt.clamp_min(1)


def _floor_solve(acc: MapEquations, radius_px: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ (V, J) holding only the floor for voxels with little data, and the solution (J, V) and its noise
    variance (J, V) under it."""
    wdiag = acc.weight_diag()                                   # (V, J)
    inside = acc.shell <= radius_px
    floor = MIN_WEIGHT_FRACTION * wdiag[inside].mean(0).clamp_min(1e-30)   # (J,)
    lam = floor[None, :].expand(len(acc.flat), -1).clone()
    X, var = acc.solve(lam)
    return lam, X, var


def signal_power(acc: MapEquations, radius_px: float) -> torch.Tensor:
    """τ² per shell of ``acc``'s first map by moments: mean |X̂|² − noise variance of X̂, at least 0 (the prior's
    signal power; units of the padded grid's Fourier coefficients)."""
    _, X, var = _floor_solve(acc, radius_px)
    return _shell_mean(X[0].abs() ** 2 - var[0], acc.shell, int(acc.shell.max()) + 1).clamp_min(0)


def solve_maps(acc: MapEquations, radius_px: float, limit: torch.Tensor, regularisation: float | None,
               prior: str = "mean", mask: torch.Tensor | None = None, *, mean_is_map0: bool = True,
               mean_power: torch.Tensor | None = None, prior_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Solve the per-voxel systems of ``acc`` and return maps (J, n, n, n); the components multiplied by ``mask``.

    ``mean_is_map0``: map 0 is the mean and maps 1.. components; False: every map is a component, fitted to data
    from which a fixed mean was subtracted (``mean_power`` is then needed with a ``regularisation``).
    λ per voxel and map: a floor for voxels with little data; with a ``regularisation`` T also the per-shell
    prior 1/(T τ²) with τ² the signal power per shell estimated by moments from a weakly regularised solution,
    mean |X̂|² − noise variance of X̂ (empirical Bayes as RELION's τ², without the feedback that drives a
    weakly supported estimate to zero); for the components τ² is pooled over them ("moments": their own excess
    power, zero where the data show no variability above the noise; "mean": up to the mean map's power per
    shell). ``mean_power`` (shells,): the mean's τ² given (:func:`signal_power` of an earlier solution, the
    padded grid's units) instead of estimated from map 0. ``limit``: the padded grid's resolution sphere;
    ``prior_scale`` (J,): each map's λ multiplied by it.
    """
    if regularisation is not None and not mean_is_map0 and mean_power is None:
        raise ValueError("solve_maps: without the mean among the maps its power (mean_power) must be given")
    lam, X, var = _floor_solve(acc, radius_px)
    first = 1 if mean_is_map0 else 0                            # index of the first component
    if regularisation is not None:
        n_sh = int(acc.shell.max()) + 1
        excess = X.abs() ** 2 - var                             # (J, V)
        if mean_power is not None:
            tau0 = mean_power.to(lam)
        else:
            tau0 = _shell_mean(excess[0], acc.shell, n_sh).clamp_min(0)
        if first:
            lam[:, 0] = torch.maximum(lam[:, 0], 1.0 / (regularisation * tau0[acc.shell]).clamp_min(1e-300))
        if acc.J > first:
            if prior == "moments":
                tau_w = _shell_mean(excess[first:].mean(0), acc.shell, n_sh)
                tau_w = torch.maximum(tau_w, MIN_COMPONENT_POWER * tau0)
            else:
                tau_w = tau0
            lam[:, first:] = torch.maximum(lam[:, first:], (1.0 / (regularisation * tau_w[acc.shell])
                                                            .clamp_min(1e-300))[:, None])
        if prior_scale is not None:
            lam = lam * prior_scale.to(lam)[None, :]
        X, _ = acc.solve(lam)
    vols = to_real_space(acc.to_grid(X), acc.n, acc.pad, limit)
    if mask is not None:
        vols[first:] = vols[first:] * mask
    return vols


def _orthonormal(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (K, V) of the row space of W (K, V)."""
    q, _ = torch.linalg.qr(W.T.to(torch.float64))
    return q.T


def subspace_sines(W1: np.ndarray | torch.Tensor, W2: np.ndarray | torch.Tensor) -> np.ndarray:
    """Sines of the principal angles between the spans of the rows of W1 (K1, V) and W2 (K2, V), descending."""
    a = _orthonormal(torch.as_tensor(np.asarray(W1).reshape(len(W1), -1)))
    b = _orthonormal(torch.as_tensor(np.asarray(W2).reshape(len(W2), -1)))
    cos = torch.linalg.svdvals(a @ b.T).clamp(0, 1)
    return torch.sqrt(1 - cos ** 2).flip(0).numpy()


def _progress_default(items: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    return items


def fit_principal_volumes(particles: Any, n_components: int, *, resolution_A: float = 0.0,
                          mask: np.ndarray | None = None, max_iter: int = 30, tol: float = 1e-3,
                          batch_size: int = 256, pad: int = 2, regularisation: float = 1.0,
                          warmup_iter: int = 3, prior: str = "mean", mean: str = "homogeneous",
                          device: torch.device | str = "cpu", seed: int = 0, cache_mb: float = 1024.0,
                          progress: ProgressFn | None = None,
                          log: logging.Logger | None = None, checkpoint: str | Path | None = None,
                          resume: bool = False) -> PrincipalVolumes:
    """Mean and ``n_components`` principal volumes of ``particles`` (a ``ParticleSet``: box, apix, euler_deg,
    shift_A, ctf, iter_batches) by PPCA-EM, with coordinates b (N, K) and their posterior s.d.

    ``resolution_A``: limit of the analysis (0 = Nyquist); images are Fourier-cropped to it.
    ``mask``: (box,)*3 map in [0, 1] restricting the components (default: a soft sphere).
    ``regularisation``: T of the per-shell prior 1/(T τ²); larger trusts the data more.
    ``mean``: "homogeneous" (the homogeneous reconstruction at the particles' full box, held fixed; the components
    fitted to all particles and to each half-set apart, and weighted per shell by the half-sets' FSC) or "joint"
    (as cryoSPARC's 3DVA: the mean fitted with the components at the working box, one fit of all particles, no
    half-set weighting; ``mean_fsc`` and the components' FSC are then None). "joint" is what classification's
    starting classes and splits use: only its coordinates matter there, it costs a third, and on a class with a
    rare state it separates what the fixed-mean fit does not (``tests/test_classify.py``).
    ``max_iter``/``tol``: EM stops when the largest principal-angle sine between successive
    component subspaces falls below ``tol`` (after ``warmup_iter``), else after ``max_iter`` iterations; the
    result says which (``converged``, ``last_change``, ``tol``, ``iterations``).
    ``checkpoint``: file written after every EM iteration, the one before kept as ``<stem>.prev<suffix>``; with
    ``resume`` the fit continues from the newest usable of the two (when there is one) and ends as an
    uninterrupted fit would.
    """
    log = log or logging.getLogger("cryohet.ppca")
    progress = progress or _progress_default
    device = torch.device(device)
    N_box, apix = int(particles.box), float(particles.apix)
    n_part = len(particles.euler_deg)
    check_inputs(n_part, N_box, apix, n_components, resolution_A, mask,
                 getattr(particles, "source", None), None)
    if prior not in ("mean", "moments"):
        raise ValueError(f"--prior must be mean or moments, got {prior!r}")
    if mean not in ("homogeneous", "joint"):
        raise ValueError(f"mean must be homogeneous or joint, got {mean!r}")
    joint = mean == "joint"
    if pad not in (1, 2, 3):
        raise ValueError(f"--pad must be 1, 2 or 3, got {pad}")
    K, J = n_components, n_components + 1
    lattice = Lattice(N_box, apix).cropped(box_for_resolution(N_box, apix, resolution_A))
    n, apix_n = lattice.box, lattice.apix
    radius_px = n // 2 - 1 if resolution_A <= 0 else min(n // 2 - 1, n * apix_n / resolution_A)
    res_used = n * apix_n / radius_px
    log.info("principal volumes: %d particles, box %d -> working box %d (%.2f Å/px), limit %.2f Å, K=%d",
             n_part, N_box, n, apix_n, res_used, K)
    need = check_pv_fits(PvShape(n, pad, K, radius_px, batch_size, n_part, cache_mb), device,
                         getattr(particles, "source", "the particles"), apix_n)
    log.info("memory plan: %.3f GB on %s", need / 1e9, device)
    # the two half-sets (rlnRandomSubset, else random) are fitted apart, so that the components' FSC between
    # them is honest; each half's images are cached (cache_mb for both). A joint mean: one fit of all particles.
    halves = particle_halves(particles, seed)
    rows = [np.arange(n_part)] if joint else [np.flatnonzero(halves == h) for h in (1, 2)]
    srcs = [ImageSource(particles.subset(r) if len(rows) > 1 else particles, lattice, radius_px, batch_size,
                        device, cache_mb / len(rows)) for r in rows]
    n_shells, shell_of = srcs[0].n_shells, srcs[0].shell
    gen = torch.Generator(device="cpu").manual_seed(seed)

    # mask for the components at the working box
    if mask is None:
        mask_n = sphere_mask(n, n / 2 - max(1.0, n / 16), max(1.0, n / 16), device=device)
    else:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=device)
        mask_n = fourier_crop_3d(m, n).clamp(0, 1) if n != N_box else m.clamp(0, 1)

    c3 = centered_coords(pad * n, device, torch.float64) / pad
    limit = ((c3[:, None, None] ** 2 + c3[None, :, None] ** 2 + c3[None, None, :] ** 2) <= radius_px ** 2).double()

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_shells, dtype=torch.float64, device=device).index_add_(0, shell_of, values.double())

    def run_pass(src: ImageSource, vols: torch.Tensor, noise: torch.Tensor | None, with_w: bool,
                 acc: MapEquations | None, desc: str
                 ) -> tuple[MapEquations | None, torch.Tensor, np.ndarray, np.ndarray]:
        """One pass over ``src``: E-step with ``vols`` (J, n, n, n: the fixed mean, then the components) and
        noise σ² per shell (None: estimate it from the first batch's residuals to the mean, or 1 without
        components); M-step statistics added to ``acc`` when given (without components: of the mean; with them:
        of the components, from the residuals to the mean); expected residual power per shell, posterior means
        and covariances of z (rows of ``src``)."""
        Jp = J if with_w else 1
        projs = [Projector(v, pad) for v in vols[:Jp]]
        res_sum = torch.zeros(n_shells, dtype=torch.float64, device=device)
        count = torch.zeros(n_shells, dtype=torch.float64, device=device)
        w = src.weight
        ones = w.double()
        z_all = np.zeros((src.n_particles, K), dtype=np.float64)
        cov_all = np.zeros((src.n_particles, K, K), dtype=np.float64)
        omega = None if noise is None else (1.0 / noise[src.shell]).to(torch.float32)
        for batch in progress(src.batches(), desc, src.n_batches()):
            idx, y, c, A = batch.rows, batch.images_ft, batch.ctf, batch.rotations
            B = len(idx)
            S = torch.stack([p.slice_points(A, src.points.kxy) for p in projs], 1)   # (B, Jp, p)
            G = S * c[:, None, :]
            r = y - G[:, 0]
            if omega is None:
                if with_w:
                    var0 = shell_sum((r.abs() ** 2).sum(0) * w) / shell_sum(ones * B)
                    omega = (1.0 / var0.clamp_min(1e-30))[src.shell].to(torch.float32)
                else:
                    omega = torch.ones(src.npix, dtype=torch.float32, device=device)
            if with_w:
                Gw = G[:, 1:]
                Gwo = Gw * (omega * w)
                M = torch.einsum("bkp,blp->bkl", Gwo.conj(), Gw).real.double()
                M = M + torch.eye(K, dtype=torch.float64, device=device)
                h = torch.einsum("bkp,bp->bk", Gwo.conj(), r).real.double()
                cov = torch.linalg.inv(M)
                cov = 0.5 * (cov + cov.transpose(1, 2))
                zh = torch.einsum("bkl,bl->bk", cov, h)
                resid = r - torch.einsum("bk,bkp->bp", zh.to(torch.complex64), Gw)
                var_term = torch.einsum("bkp,blp,bkl->bp", Gw.conj(), Gw, cov.to(torch.complex64)).real
                e2 = resid.abs() ** 2 + var_term
                if joint:       # the mean is fitted too: z̃ = (1, z)
                    data, zt = y, torch.cat([torch.ones(B, 1, dtype=torch.float64, device=device), zh], 1)
                    Ezz = zt[:, :, None] * zt[:, None, :]
                    Ezz[:, 1:, 1:] += cov
                else:
                    data, zt, Ezz = r, zh, zh[:, :, None] * zh[:, None, :] + cov
                z_all[idx] = zh.cpu().numpy()
                cov_all[idx] = cov.cpu().numpy()
            else:
                e2 = r.abs() ** 2
                data = y
                zt = torch.ones(B, 1, dtype=torch.float64, device=device)
                Ezz = torch.ones(B, 1, 1, dtype=torch.float64, device=device)
            res_sum += shell_sum(e2.sum(0) * w)
            count += shell_sum(ones * B)
            if acc is not None:
                pos = slice_coords(A, n, pad).reshape(B, -1, 3)[:, src.flat]
                acc.insert(pos, 0.5 * w, data, c, omega, zt, Ezz)
        return acc, res_sum / count.clamp_min(1), z_all, cov_all

    t0 = time.time()
    settings = {"n_particles": n_part, "box": N_box, "apix": round(apix, 6), "n_components": K, "work_box": n,
                "radius_px": round(float(radius_px), 6), "pad": pad, "regularisation": regularisation,
                "prior": prior, "warmup_iter": warmup_iter, "seed": seed, "mask": mask_digest(mask_n),
                "mean": mean, "halves": [len(r) for r in rows]}
    mean_fsc: np.ndarray | None = None
    mean_power: torch.Tensor | None = None
    if joint:
        # the starting mean: the CTF-weighted backprojection at the working box, refitted in every M-step
        acc0 = MapEquations(n, pad, radius_px, 1, device)
        run_pass(srcs[0], torch.zeros((1, n, n, n), device=device), None, False, acc0, "principal volumes: mean")
        mean_n = solve_maps(acc0, radius_px, limit, None, prior, mask_n)[0]
    else:
        # the mean: the homogeneous reconstruction of the particles at their full box (FSC-weighted), held fixed;
        # the components are fitted to the residuals of the images to its projections
        rec = fsc_weighted_reconstruction(particles, halves, batch_size, device, progress=progress)
        mean_full = rec.full.to(torch.float32).cpu()
        mean_n = rec.full.to(device=device, dtype=torch.float32)
        mean_n = fourier_crop_3d(mean_n, n) if n != N_box else mean_n
        mean_fsc = rec.fsc
        log.info("principal volumes: mean = homogeneous reconstruction, half-map FSC 0.143 at %.2f Å",
                 rec.resolution(0.143))
        del rec
        # the mean's signal power per shell, for the components' prior (one pass, in the M-step's units)
        acc0 = MapEquations(n, pad, radius_px, 1, device)
        for h, src in enumerate(srcs):
            run_pass(src, mean_n[None], None, False, acc0, f"principal volumes: mean's power, half-set {h + 1}")
        mean_power = signal_power(acc0, radius_px)
    del acc0

    def m_step(acc: MapEquations, use_prior: bool) -> torch.Tensor:
        return solve_maps(acc, radius_px, limit, regularisation if use_prior else None, prior, mask_n,
                          mean_is_map0=joint, mean_power=mean_power)

    ckpt = Path(checkpoint) if checkpoint is not None else None
    found = load_state(ckpt, settings, log) if resume and ckpt is not None else None
    noise: list[torch.Tensor | None]
    # three fits side by side: all particles (its components and coordinates are the result), and each half-set
    # alone (their agreement says to which resolution each component is supported); a joint mean: the first only
    fits = ((("all particles", (0,)),) if joint else
            (("all particles", (0, 1)), ("half-set 1", (0,)), ("half-set 2", (1,))))
    n_fits = len(fits)
    if found is not None:
        used, state = found
        # the checkpoint holds the fits' maps one after the other (n_fits J maps) and their noise spectra
        vols, history = state.vols.to(device).reshape(n_fits, J, n, n, n), state.history
        noise = list(state.noise.to(device).reshape(n_fits, -1))
        log.info("resuming from %s after EM iteration %d", used, state.iteration)
    else:
        if resume:
            log.info("--resume: no checkpoint at %s, starting from scratch", ckpt)
        # initial components (every fit): smooth random maps inside the mask, at a tenth of the mean's spread
        m0 = max(4, (n // 8) * 2)
        rnd = torch.stack([fourier_pad_3d(torch.randn((m0,) * 3, generator=gen), n) for _ in range(K)]).to(device)
        rnd = rnd * mask_n
        rnd = rnd / rnd.reshape(K, -1).norm(dim=1)[:, None, None, None] * 0.1 * mean_n.norm()
        vols = torch.cat([mean_n[None], rnd], 0)[None].repeat(n_fits, 1, 1, 1, 1)     # (fit, J, n, n, n)
        noise = [None] * n_fits
        history = []

    def e_step(f: int, vol: torch.Tensor, acc: MapEquations | None, desc: str
               ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """E-step (and M-step statistics into ``acc``) of fit ``f`` over its half-sets: noise spectrum,
        coordinates and their covariances (rows: its half-sets' particles one after the other)."""
        parts = [run_pass(srcs[h], vol, noise[f], True, acc, f"{desc}, {fits[f][0]}") for h in fits[f][1]]
        counts = [srcs[h].n_particles for h in fits[f][1]]
        new_noise = sum(p[1] * c for p, c in zip(parts, counts, strict=True)) / sum(counts)
        return new_noise, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])

    prev_basis = [_orthonormal(v[1:].reshape(K, -1)) for v in vols]
    last = len(history) if _met_tolerance(history, warmup_iter, tol) else max_iter  # a converged fit stays so
    for it in range(len(history) + 1, last + 1):
        ti = time.time()
        changes = []
        for f in range(n_fits):
            acc = MapEquations(n, pad, radius_px, J if joint else K, device)
            new_noise, z_it, cov_it = e_step(f, vols[f], acc, f"principal volumes: EM {it}/{max_iter}")
            maps = m_step(acc, it > warmup_iter).double()
            del acc
            # parameter expansion (PX-EM, Liu, Rubin & Wu 1998): the latents' second moment (with a joint mean their
            # covariance, their mean going into the mean) is absorbed into the components, which speeds up EM for
            # factor models
            psi = (z_it.T @ z_it + cov_it.sum(0)) / len(z_it)
            if joint:
                alpha = z_it.mean(0)
                psi = psi - np.outer(alpha, alpha)
                W = maps[1:].reshape(K, -1)
                vols[f, 0] = (maps[0].reshape(-1) + torch.as_tensor(alpha, device=device) @ W
                              ).reshape(n, n, n).to(torch.float32)
            else:
                W = maps.reshape(K, -1)
            L = torch.as_tensor(np.linalg.cholesky(psi + 1e-9 * np.eye(K)), dtype=torch.float64, device=device)
            # rotate the components to orthogonal directions (an invariance of PPCA with z ~ N(0, I))
            _, s, vt = torch.linalg.svd(L.T @ W, full_matrices=False)
            vols[f, 1:] = (torch.diag(s) @ vt).reshape(K, n, n, n).to(torch.float32)
            noise[f] = new_noise.clamp_min(1e-30)
            basis = _orthonormal(vols[f, 1:].reshape(K, -1))
            cos_min = float(torch.linalg.svdvals(prev_basis[f] @ basis.T).clamp(0, 1).min())
            changes.append(math.sqrt(max(0.0, 1 - cos_min ** 2)))
            prev_basis[f] = basis
            if f == 0:
                variance = float((s ** 2).sum())
        change = max(changes)
        history.append({"iteration": it, "subspace_change_sine": change, "seconds": time.time() - ti,
                        "variance": variance})
        per_fit = " (all %.2e, half-sets %.2e, %.2e)" if len(changes) == 3 else ""
        log.info("EM %d: subspace change sin %.2e" + per_fit + ", total variance %.4g, %.1f s",
                 it, change, *(changes if per_fit else ()), variance, time.time() - ti)
        if ckpt is not None:
            save_state(ckpt, EMState(vols.reshape(n_fits * J, n, n, n), torch.cat(noise), it, history), settings)
        if _met_tolerance(history, warmup_iter, tol):
            break
    converged = _met_tolerance(history, warmup_iter, tol)
    last_change = history[-1]["subspace_change_sine"] if history else math.nan
    log.info("principal volumes: EM %s after %d iterations: last subspace change %.2e, tolerance %.2e",
             "converged" if converged else "stopped at the iteration limit without converging", len(history),
             last_change, tol)
    # coordinates of every particle from a last E-step with the components of all particles; those weighted per
    # principal direction and shell by the FSC between the half-sets' fits (turned onto them: PPCA determines
    # components up to a rotation)
    noise_final, z_fit, cov_fit = e_step(0, vols[0], None, "principal volumes: coordinates")
    order = np.concatenate(rows)
    z, cov = np.zeros((n_part, K)), np.zeros((n_part, K, K))
    z[order], cov[order] = z_fit, cov_fit
    comp_fsc: np.ndarray | None = None
    comp_res: np.ndarray | None = None
    if joint:
        mean_full = fourier_pad_3d(vols[0, 0], N_box).cpu()
        W_n = vols[0, 1:]
    else:
        W_n, comp_fsc = weight_by_halves(*(v[1:].reshape(K, -1).double() for v in vols), n)
        comp_res = np.array([resolution_at(c, n, apix_n, 0.143) for c in comp_fsc])
        log.info("principal volumes: FSC 0.143 of the principal volumes between half-sets at %s Å",
                 ", ".join(f"{r:.2f}" for r in comp_res))

    # orthonormal principal volumes at the particles' box
    W_full = torch.stack([fourier_pad_3d(w, N_box).cpu() for w in W_n]).reshape(K, -1).double()
    u, s, vt = torch.linalg.svd(W_full.T, full_matrices=False)    # W_fullᵀ = U S Vᵀ
    X = u.T                                                        # (K, V)
    signs = torch.sign(X @ mean_full.reshape(-1).double())
    signs[signs == 0] = 1
    X = X * signs[:, None]
    Tm = (signs[:, None] * torch.diag(s) @ vt).numpy()             # b = T z
    b = z @ Tm.T
    cov_b = np.einsum("kl,nlm,jm->nkj", Tm, cov, Tm)
    std_b = np.sqrt(np.clip(np.einsum("nkk->nk", cov_b), 0, None))
    log.info("principal volumes: eigenvalues %s, %.1f s", np.array2string((s ** 2).numpy(), precision=4),
             time.time() - t0)
    return PrincipalVolumes(
        mean=mean_full.numpy().astype(np.float32),
        components=X.reshape((K,) + (N_box,) * 3).numpy().astype(np.float32),
        eigenvalues=(s ** 2).numpy(), latents=b, latent_std=std_b,
        noise_var=noise_final.cpu().numpy(), apix=apix, work_box=n, resolution_A=float(res_used),
        history=history, converged=converged, last_change=last_change, tol=tol, iterations=len(history),
        component_fsc=comp_fsc, component_resolution_A=comp_res, mean_fsc=mean_fsc)


def weight_by_halves(W: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, n: int
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """Components ``W`` (K, n³, fitted to all particles) weighted by the agreement of the half-sets' fits ``W1``,
    ``W2`` (K, n³): each half's components are turned onto W (orthogonal Procrustes: PPCA determines them up to
    a rotation); along each principal direction of W (X = R W, orthonormal) the FSC between the halves' X gives
    per-shell weights √(2 FSC / (1 + FSC)), zero from where it first falls below ``COMPONENT_FSC``
    (``reconstruct.fsc.fsc_shell_weights``); the weighted X̃ is turned back (R⁻¹ X̃), so that the coordinates of
    W still apply. Returns the maps (K, n, n, n) and the FSC of each principal direction (K, n // 2 + 1)."""
    K = len(W)
    u, s, _ = torch.linalg.svd(W, full_matrices=False)                    # W = U S Vᵀ, X = Vᵀ = S⁻¹ Uᵀ W
    R = torch.diag(1.0 / s.clamp_min(1e-30)) @ u.T
    X = R @ W
    halves = []
    for Wh in (W1, W2):
        a, _, bt = torch.linalg.svd(W @ Wh.T)
        halves.append(R @ ((a @ bt) @ Wh))
    out, curves = [], []
    for k in range(K):
        h1, h2 = (h[k].reshape(n, n, n) for h in halves)
        curve = fsc(h1, h2)
        out.append(weight_shells(X[k].reshape(n, n, n), fsc_shell_weights(curve, COMPONENT_FSC)).reshape(-1))
        curves.append(curve)
    Wt = (u @ torch.diag(s)) @ torch.stack(out)
    return Wt.reshape(K, n, n, n).float(), np.stack(curves)


def _met_tolerance(history: list[dict[str, float]], warmup_iter: int, tol: float) -> bool:
    """Whether the last EM iteration, past the warm-up, changed the component subspace by less than ``tol``
    (the sine of the largest principal angle)."""
    return bool(history) and history[-1]["iteration"] > warmup_iter and history[-1]["subspace_change_sine"] < tol
