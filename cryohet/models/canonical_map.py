"""A consensus map as points on a regular grid inside a mask, with amplitudes fitted by least squares.

The canonical map of ``models.deformed_map`` is ``DisplacedAtoms``' sum of Gaussians (width 0.225 × resolution)
centred on a regular grid of spacing ``grid_A`` (centred on the box centre) inside a mask: the user's, or the
consensus low-passed at the resolution above a threshold (by default ``AUTO_THRESHOLD`` of its maximum), its
largest connected piece dilated by half the resolution. The amplitudes minimise

    Σ_k |E(k) Σ_i w_i exp(−2πi k·r_i) − F(k)|²       (k below the resolution, half of Fourier space)

with E the Gaussians' transform as ``geometry.gaussian_slices`` writes it (voxel sinc and raised-cosine low-pass
of ``geometry.gaussians.gaussian_map``) and F = ``fft3c`` of the consensus: conjugate gradients on the normal
equations, so that the points rendered by ``gaussian_map`` reproduce the consensus below the resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryohet.device import refuse_unless_fits
from cryohet.errors import InputError
from cryohet.geometry.fourier import fft3c
from cryohet.geometry.gaussian_slices import raised_cosine_lowpass
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION, lowpass_map
from cryohet.io.atomic_model import Atoms, box_centre_A
from cryohet.models.gaussian_mixture import support_threshold

#: default threshold of the low-passed consensus for the mask, as a fraction of its maximum
AUTO_THRESHOLD = 0.1
#: the mask must hold at least this fraction of the consensus' density above the noise (else it excludes the particle)
MIN_MASS_INSIDE = 0.5


@dataclass
class AmplitudeFit:
    weights: np.ndarray      # (P,) amplitudes (density × Å³ before the low-pass, gaussian_map's units)
    residual: float          # ‖E·Σ w e^{-2πik·r} − F‖ / ‖F‖ below the resolution
    iterations: int


def consensus_mask(consensus: np.ndarray, apix: float, resolution_A: float, mask: np.ndarray | None,
                   threshold: float, source: str | Path, mask_source: str | Path | None) -> np.ndarray:
    """Boolean (z, y, x) mask of the particle: ``mask`` > 0.5, or the consensus low-passed at ``resolution_A``
    above ``threshold`` (≤ 0: ``AUTO_THRESHOLD`` × its maximum), largest piece, dilated by resolution/2.
    InputError naming the mask (or the consensus) when it holds less than ``MIN_MASS_INSIDE`` of the density
    above the noise around the particle (``gaussian_mixture.support_threshold``)."""
    from scipy import ndimage

    low = lowpass_map(torch.as_tensor(consensus, dtype=torch.float64), apix, resolution_A).numpy()
    if low.max() <= 0:
        raise InputError(source, "the consensus map has no positive density")
    if mask is not None:
        keep = mask > 0.5
    else:
        level = threshold if threshold > 0 else AUTO_THRESHOLD * float(low.max())
        keep = low > level
        if not keep.any():
            raise InputError(source, f"no voxel of the consensus low-passed at {resolution_A:g} Å is above the "
                                     f"threshold {level:.4g} (maximum {low.max():.4g}): lower --threshold")
        label, n = ndimage.label(keep)
        keep = label == 1 + int(np.argmax(ndimage.sum(keep, label, range(1, n + 1))))
        r = max(1, round(resolution_A / 2 / apix))
        ball = np.sum(np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1] ** 2, 0) <= r * r
        keep = ndimage.binary_dilation(keep, ball)
    # the particle's density is what lies above the noise around it (support_threshold): an unmasked consensus
    # from noisy images holds as much positive noise in its solvent as density in the particle
    particle = np.where(low > support_threshold(low, apix), low, 0.0)
    if not particle.any():
        raise InputError(source, f"no voxel of the consensus low-passed at {resolution_A:g} Å stands above the "
                                 "noise around the particle (5 σ of the values outside 0.45 × the box)")
    inside = float(particle[keep].sum() / particle.sum())
    if inside < MIN_MASS_INSIDE:
        raise InputError(mask_source or source, f"the mask holds {100 * inside:.0f} % of the consensus map's "
                                                f"density above its noise (at least {100 * MIN_MASS_INSIDE:.0f} % "
                                                "needed): it excludes the particle (is it for another map or box?)")
    return keep


def grid_count(mask: np.ndarray, apix: float, grid_A: float) -> int:
    """About how many grid points of spacing ``grid_A`` fall in ``mask`` (its volume / grid_A³), before any
    point is made."""
    return int(math.ceil(mask.sum() * apix ** 3 / grid_A ** 3))


def grid_points(mask: np.ndarray, apix: float, grid_A: float) -> np.ndarray:
    """Points (P, 3) Å (x, y, z) in the map frame (voxel i at i·apix) of the regular grid of spacing ``grid_A``
    through the box centre, where the nearest voxel of ``mask`` is set."""
    box = mask.shape[0]
    centre = box_centre_A(box, apix)
    half = math.floor(centre[0] / grid_A)
    u = np.arange(-half, half + 1) * grid_A
    zz, yy, xx = np.meshgrid(u, u, u, indexing="ij")
    xyz = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) + centre
    idx = np.clip(np.rint(xyz / apix).astype(np.int64), 0, box - 1)
    return xyz[mask[idx[:, 2], idx[:, 1], idx[:, 0]]]


def point_atoms(xyz_A: np.ndarray, weights: np.ndarray, source: str | Path) -> Atoms:
    """The points as ``Atoms`` (one pseudo-atom 'PT' per point)."""
    n = len(xyz_A)
    return Atoms(xyz_A=np.asarray(xyz_A, np.float64), weight=np.asarray(weights, np.float64),
                 chain=np.full(n, "A"), resseq=np.arange(1, n + 1), resname=np.full(n, "DEF"),
                 name=np.full(n, "PT"), element=np.full(n, "C"), source=Path(source))


def _separable(grid: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The matrix ``m`` (a, n) applied along each axis of ``grid`` (n, n, n) -> (a, a, a)."""
    out = grid
    for _ in range(3):  # contract the first axis, append the result as the last: z, then y, then x
        out = torch.tensordot(out, m, dims=([0], [1]))
    return out


def fit_amplitudes(rel_A: np.ndarray, grid_A: float, consensus: np.ndarray, apix: float, resolution_A: float,
                   iterations: int = 100, tol: float = 1e-4) -> AmplitudeFit:
    """Least-squares amplitudes of Gaussians at ``rel_A`` (P, 3) Å from the box centre, points of the regular
    grid of spacing ``grid_A`` through the centre, for the map ``consensus`` (see the module doc): conjugate
    gradients (at most ``iterations``, relative tolerance ``tol`` on the normal equations' residual). The grid and
    the transform's frequencies are both Cartesian, so the transform of the points is three small matrix products
    (one per axis) rather than a (frequencies × points) matrix."""
    box = consensus.shape[0]
    idx = np.rint(np.asarray(rel_A) / grid_A).astype(np.int64)
    if np.abs(idx * grid_A - rel_A).max() > 1e-6 * grid_A + 1e-9:
        raise ValueError("the points are not on the grid of spacing grid_A through the box centre")
    half = int(np.abs(idx).max())
    n = torch.arange(-half, half + 1, dtype=torch.float64) * grid_A                       # grid coordinates, Å
    k = (torch.arange(box, dtype=torch.float64) - box // 2) / (box * apix)               # 1/Å
    e = torch.polar(torch.ones(box, len(n), dtype=torch.float64), -2 * math.pi * k[:, None] * n[None, :])
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    sigma = SIGMA_PER_RESOLUTION * resolution_A
    env = (torch.exp(-2 * math.pi ** 2 * sigma ** 2 * k2) / apix ** 3
           * torch.sinc(kx * apix) * torch.sinc(ky * apix) * torch.sinc(kz * apix)
           * raised_cosine_lowpass(k2.sqrt(), resolution_A, 1.5 / (box * apix)))
    target = fft3c(torch.as_tensor(consensus, dtype=torch.float64)) * (env > 0)
    where = tuple(torch.as_tensor(idx[:, i] + half) for i in (2, 1, 0))                 # (z, y, x) grid indices

    def forward(w: torch.Tensor) -> torch.Tensor:  # E · Σ_i w_i exp(−2πi k·r_i) on the box's frequencies
        grid = torch.zeros((len(n),) * 3, dtype=torch.complex128)
        grid[where] = w.to(grid.dtype)
        return env * _separable(grid, e)

    def adjoint(v: torch.Tensor) -> torch.Tensor:  # Re(Aᴴ v) at the points
        return _separable(env * v, e.conj().T).real[where]

    rhs = adjoint(target)
    w = torch.zeros(len(idx), dtype=torch.float64)
    res, p = rhs.clone(), rhs.clone()
    rr, it = float(res @ res), 0
    stop = tol ** 2 * rr
    while it < iterations and rr > stop:
        ap = adjoint(forward(p))
        alpha = rr / float(p @ ap)
        w += alpha * p
        res -= alpha * ap
        rr_new = float(res @ res)
        p = res + (rr_new / rr) * p
        rr, it = rr_new, it + 1
    return AmplitudeFit(w.numpy(), float((forward(w) - target).norm() / target.norm()), it)


#: fraction of the device's free memory the training may plan to use
MEMORY_FRACTION = 0.5
#: images per batch of the weight calibration (``data.prepare.prepared_sample``'s)
CALIBRATION_BATCH = 64


@dataclass
class CanonicalPoints:
    atoms: Atoms             # the points (map frame) with amplitudes normalised to mean |w| = 1
    fit: AmplitudeFit        # the least-squares fit (amplitudes in gaussian_map's units)
    mask: np.ndarray         # (z, y, x) bool
    radius_A: float          # farthest point from the box centre plus one grid step


def bytes_per_point(batch: int, n_freq: int, field: str, flow_dim: int, flow_layers: int) -> int:
    """Device memory (bytes) a training step needs per canonical point: the phases kept for the slices' backward
    pass (cos and sin per image and frequency, float32, and as much again of temporaries) and, for the flow
    field, its MLP's activations and their gradients per image."""
    b = max(batch, CALIBRATION_BATCH)
    per = 2 * 2 * 4 * b * n_freq
    if field == "flow":
        per += 3 * 4 * b * flow_dim * (flow_layers + 2)
    return per


def canonical_model_points(consensus: np.ndarray, apix: float, resolution_A: float, grid_A: float,
                           mask: np.ndarray | None, threshold: float, source: str | Path,
                           mask_source: str | Path | None,
                           batch: int, n_freq: int, field: str, flow_dim: int, flow_layers: int,
                           device: torch.device) -> CanonicalPoints:
    """The canonical points of ``consensus`` (see the module doc), after checking before they are made that a
    training step on ``device`` fits in its free memory (``bytes_per_point``): InputError naming the consensus
    map (or the mask) otherwise, with the largest number of points that fits."""
    keep = consensus_mask(consensus, apix, resolution_A, mask, threshold, source, mask_source)
    n_est = grid_count(keep, apix, grid_A)
    per = bytes_per_point(batch, n_freq, field, flow_dim, flow_layers)
    refuse_unless_fits(n_est * per, device, MEMORY_FRACTION, mask_source or source,
                       f"a {grid_A:g} Å grid puts about {n_est} points in the mask, which in a training step of "
                       f"{batch} images", lambda usable: f"{int(usable // per)} points",
                       "raise --grid_A, lower --batch_size or use a tighter mask")
    xyz = grid_points(keep, apix, grid_A)
    if len(xyz) < 4:
        raise InputError(mask_source or source, f"only {len(xyz)} grid points of {grid_A:g} Å fall in the mask: "
                                                "lower --grid_A")
    centre = box_centre_A(consensus.shape[0], apix)
    fit = fit_amplitudes(xyz - centre, grid_A, consensus, apix, resolution_A)
    scale = float(np.abs(fit.weights).mean())
    radius = float(np.linalg.norm(xyz - centre, axis=1).max()) + grid_A
    return CanonicalPoints(point_atoms(xyz, fit.weights / scale, source), fit, keep, radius)
