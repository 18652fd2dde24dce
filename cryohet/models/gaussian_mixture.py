"""A Gaussian mixture of a consensus map deformed by an MLP of z (e2gmm / DynaMight class).

    x_i(z) = x0_i + MLP(z)_i        (Å; Gaussians i = 1..N placed on the consensus map)

The Gaussians are pseudo-atoms of the map (``models.pseudo_atoms``) or the residues of an atomic model, all of one
width (``SIGMA_PER_RESOLUTION`` × resolution, as every atom model here) with amplitudes that are parameters
(``learn_weights``), first fitted to the consensus map (``fit_amplitudes``) so that the model at the start of
training reproduces it. The decoder is ``models.atomic_decoder.MLPDisplacedAtoms``' (the atomic decoder's).

Number of Gaussians (``gaussian_count``): one per (resolution / 2)³ of the support (the mask, or the map above its
threshold), between ``MIN_GAUSSIANS`` and ``MAX_GAUSSIANS`` (DynaMight and e2gmm use thousands to tens of
thousands). Their spacing (``spacing_A``) is the median distance of a Gaussian to its nearest neighbour; it scales
the restraints (``methods.train_gmm``) and is kept with the model.

Displacement field at any canonical point x (``displacement_field``): modified Shepard interpolation (Franke &
Little) of the displacements of the ``FIELD_NEIGHBOURS`` nearest Gaussians (reference positions), weights
((R − r) / (R·r))² normalised, R the distance of the next nearest Gaussian: exact at the Gaussians' centres,
continuous (a Gaussian's weight falls to zero where it leaves the neighbourhood) and local (R is about two spacings,
a few Å); chunked over points.

File: ``model.safetensors`` as the atomic decoder's, with ``spacing_A`` in the architecture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from cryohet.geometry.gaussians import render_gaussians
from cryohet.io.atomic_model import Atoms
from cryohet.models.atomic_decoder import MLPDisplacedAtoms

MODEL_TYPE = "gaussian_mixture"  # the run record's model_type (cryohet.models.base)
MODEL_FORMAT = "cryohet-gaussian-mixture-1"
MIN_GAUSSIANS, MAX_GAUSSIANS = 50, 30000
#: Gaussians whose displacements are interpolated at a point, and the smallest distance in the weights, Å.
FIELD_NEIGHBOURS = 8
FIELD_EPS_A = 1e-4
#: The interpolation weights of the last set of points are kept when they are at most this many (16 bytes each).
FIELD_CACHE_ENTRIES = 1 << 24


def gaussian_count(support_voxels: int, apix: float, resolution_A: float) -> int:
    """One Gaussian per (resolution_A / 2)³ Å³ of a support of ``support_voxels`` voxels of ``apix`` Å, clipped to
    ``MIN_GAUSSIANS`` .. ``MAX_GAUSSIANS``."""
    n = int(round(support_voxels * apix ** 3 / (resolution_A / 2) ** 3))
    return int(np.clip(n, MIN_GAUSSIANS, MAX_GAUSSIANS))


def spacing_A(xyz_A: np.ndarray) -> float:
    """Median distance (Å) of each point of ``xyz_A`` (N, 3) to its nearest neighbour."""
    d, _ = cKDTree(xyz_A).query(xyz_A, k=2)
    return float(np.median(d[:, 1]))


_Chunk = tuple[torch.Tensor, torch.Tensor]  # interpolation weights (p, K) and Gaussian indices (p, K)


class GaussianMixture(MLPDisplacedAtoms):
    """Gaussians ``atoms`` (map frame, Å; weights their amplitudes, learned) displaced by an MLP of z;
    ``spacing_A``: their median nearest-neighbour distance (Å)."""

    MODEL_FORMAT, WHAT, WEIGHT_KEY = MODEL_FORMAT, "Gaussian-mixture", "gaussian_weight"

    def __init__(self, atoms: Atoms, box: int, apix: float, resolution_A: float, zdim: int, layers: int = 3,
                 dim: int = 256, seed: int = 0, spacing_A: float = 4.0, scale: float = 1.0, data_scale: float = 1.0):
        super().__init__(atoms, box, apix, resolution_A, zdim, layers, dim, seed, scale, data_scale,
                         learn_weights=True)
        self.spacing_A = float(spacing_A)
        self._tree: cKDTree | None = None
        self._field_cache: tuple[torch.Tensor, tuple[int, int, str], list[_Chunk]] | None = None

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "spacing_A": self.spacing_A}

    def field_neighbours(self, x_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances (P, K + 1) Å, indices (P, K + 1)) of the ``FIELD_NEIGHBOURS`` + 1 reference Gaussians
        nearest to the points ``x_A`` (P, 3) Å relative to the box centre, nearest first."""
        if self._tree is None:
            self._tree = cKDTree(self.rel0_A.detach().cpu().double().numpy())
        k = min(FIELD_NEIGHBOURS + 1, len(self.atoms))
        d, i = self._tree.query(np.asarray(x_A, np.float64).reshape(-1, 3), k=k)
        return d.reshape(-1, k), i.reshape(-1, k)

    @staticmethod
    def field_weights(dist_A: np.ndarray) -> np.ndarray:
        """Normalised Franke-Little weights (P, K) of the neighbours at sorted distances ``dist_A`` (P, K + 1) Å
        (the last one, R, is where the weights reach zero)."""
        r, big = dist_A[:, :-1], dist_A[:, -1:]
        big = np.maximum(big, r[:, -1:] + FIELD_EPS_A)  # ties (or fewer than K + 1 Gaussians): still positive
        w = ((big - r) / (big * np.maximum(r, FIELD_EPS_A))) ** 2
        return w / w.sum(1, keepdims=True)

    def interpolation(self, x_A: torch.Tensor, device: torch.device, chunk_points: int = 1 << 16
                      ) -> list[_Chunk]:
        """Per chunk of ``chunk_points`` points of ``x_A`` (P, 3) Å: (weights (p, K), Gaussian indices (p, K)) on
        ``device``. The last set of points is cached (the same tensor, unchanged: a reconstruction asks for the
        same grid at every batch) when it holds at most ``FIELD_CACHE_ENTRIES`` weights."""
        cached = self._field_cache
        if (cached is not None and cached[0] is x_A and cached[1] == (x_A._version, chunk_points, str(device))):
            return cached[2]
        pts = x_A.detach().cpu().double().numpy().reshape(-1, 3)
        parts = []
        for s in range(0, len(pts), chunk_points):
            dist, idx = self.field_neighbours(pts[s:s + chunk_points])
            parts.append((torch.as_tensor(self.field_weights(dist), dtype=torch.float32, device=device),
                          torch.as_tensor(idx[:, :-1], device=device)))
        if len(pts) * FIELD_NEIGHBOURS <= FIELD_CACHE_ENTRIES:
            self._field_cache = (x_A, (x_A._version, chunk_points, str(device)), parts)
        return parts

    def displacement_field(self, z: torch.Tensor, x_A: torch.Tensor, chunk_points: int = 1 << 16) -> torch.Tensor:
        """Displacements (B, P, 3) Å at latents ``z`` (B, zdim) of canonical points ``x_A`` (P, 3) Å relative to
        the box centre (the point x lies at x + d(z, x) in conformation z), on ``z``'s device."""
        d_g = self.displacements(z.to(self.rel0_A.device).float())                # (B, N, 3)
        out = torch.empty((len(z), len(x_A), 3), dtype=d_g.dtype, device=d_g.device)
        s = 0
        for w, i in self.interpolation(x_A, d_g.device, chunk_points):
            out[:, s:s + len(i)] = (d_g[:, i] * w[None, :, :, None]).sum(2)
            s += len(i)
        return out.to(z.device)


def fit_amplitudes(rel_A: np.ndarray, target: np.ndarray, apix: float, resolution_A: float,
                   device: torch.device, iterations: int = 500, tol: float = 1e-3
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Non-negative amplitudes (N,) of Gaussians at ``rel_A`` (N, 3) Å (from the box centre) whose map
    (``geometry.gaussians.render_gaussians``) best fits ``target`` (box³, z, y, x) in least squares: accelerated
    projected gradient (FISTA) with the step from the operator's norm (power iteration). Returns the amplitudes,
    the fitted map and {iterations, relative change of the last step, converged}."""
    box = target.shape[0]
    rel = torch.as_tensor(rel_A, dtype=torch.float64, device=device)
    tgt = torch.as_tensor(target, dtype=torch.float32, device=device)

    def render(w: torch.Tensor) -> torch.Tensor:
        return render_gaussians(rel, w, box, apix, resolution_A)

    def gram(w: torch.Tensor) -> torch.Tensor:  # Aᵀ A w, the adjoint by autograd (the map is linear in w)
        w = w.detach().requires_grad_(True)
        m = render(w)
        return torch.autograd.grad(0.5 * (m * m.detach()).sum(), w)[0]

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(len(rel), dtype=torch.float64, device=device, requires_grad=True)
        return torch.autograd.grad((render(w) * r).sum(), w)[0]

    v = torch.ones(len(rel), dtype=torch.float64, device=device)
    for _ in range(20):  # power iteration: the largest eigenvalue of AᵀA
        v = gram(v)
        lip = float(v.norm())
        v = v / lip
    step = 1.0 / (1.05 * lip)
    aty = adjoint(tgt)
    w = torch.clamp(aty * step, min=0.0)
    y, t, change, it = w.clone(), 1.0, float("inf"), 0
    while it < iterations and change > tol:
        new = torch.clamp(y - step * (gram(y) - aty), min=0.0)
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        y = new + (t - 1) / t_new * (new - w)
        change = float((new - w).norm() / new.norm().clamp_min(1e-30))
        w, t, it = new, t_new, it + 1
    with torch.no_grad():
        fitted = render(w).cpu().numpy()
    return w.cpu().numpy(), fitted, {"iterations": it, "last_change": change, "tol": tol, "converged": change <= tol}


def load_run_model(run_dir: str | Path, model_path: str | Path) -> GaussianMixture:
    """The ``VolumeModel`` of a train-gmm run."""
    return GaussianMixture.load(model_path)


def support_threshold(volume: np.ndarray, apix: float) -> float:
    """Automatic threshold of a map (z, y, x): the larger of 5 σ of its values outside the sphere of radius
    0.45 × box (the noise around the particle) and 5 % of its 99.9th percentile (the particle's density)."""
    box = volume.shape[0]
    r = np.linalg.norm(np.indices(volume.shape) - box // 2, axis=0)
    outside = volume[r > 0.45 * box]
    noise = float(outside.std()) if outside.size else 0.0
    return max(5.0 * noise, 0.05 * float(np.percentile(volume, 99.9)))


def batch_bytes(n_gaussians: int, n_points: int, batch: int, cutoff_factor: float) -> int:
    """Estimated memory (bytes) of one training step: the slices' saved cos and sin (2 × 4 × B·M·N; float32), the
    positions and their gradients (about 18 floats per Gaussian and image) and the elastic network's springs
    (about (2/3)·π·cutoff_factor³ per Gaussian, 12 floats per spring and image)."""
    springs = n_gaussians * (2.0 / 3.0) * np.pi * cutoff_factor ** 3
    return int(8 * batch * n_points * n_gaussians + 72 * batch * n_gaussians + 48 * batch * springs)


def max_gaussians(free_bytes: float, n_points: int, batch: int, cutoff_factor: float) -> int:
    """The largest number of Gaussians whose ``batch_bytes`` fits in ``free_bytes``."""
    per = batch_bytes(1, n_points, batch, cutoff_factor)
    return int(free_bytes // max(per, 1))
