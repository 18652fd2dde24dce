"""Conformational landscape from latents: density deconvolved from each particle's latent uncertainty, free energy,
minima and minimum free-energy paths.

The density p lives on a regular grid. Each particle's latent z_i is taken as a draw from p blurred by its own
Gaussian uncertainty Σ_i (diagonal, from the method: principal volumes' posterior s.d., the VAE's log-variance)
plus an isotropic smoothing h²; p is the maximum-likelihood mixture on the grid (EM for the nonparametric maximum
likelihood estimate), so broad uncertainties are removed from the landscape rather than added to it. The smoothing h
is the regularisation: it is chosen by the log-likelihood of held-out particles (5-fold cross-validation). The free
energy is G = −log p in kT, zero at its minimum; its uncertainty is the standard deviation over bootstrap resamples
of the particles. A minimum free-energy path between two grid points minimises ∫ exp(G) ds (Dijkstra on the grid's
neighbour graph), the path of largest flux.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import map_coordinates, minimum_filter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from cryohet.data.loader import Progress

#: Grids are built for at most this many latent dimensions (beyond it: reduce with PCA first).
MAX_GRID_DIMS = 4
DEFAULT_GRID = {1: 200, 2: 60, 3: 24, 4: 12}


@dataclass
class Grid:
    """A regular grid: ``axes`` (one 1-D array of coordinates per dimension)."""

    axes: list[np.ndarray]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def step(self) -> np.ndarray:
        return np.array([a[1] - a[0] for a in self.axes])

    def points(self) -> np.ndarray:
        """All grid points (G, d), C order."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)

    def index_of(self, z: np.ndarray) -> np.ndarray:
        """Fractional grid indices (N, d) of points ``z``."""
        return (np.atleast_2d(z) - np.array([a[0] for a in self.axes])) / self.step

    def sample(self, values: np.ndarray, z: np.ndarray) -> np.ndarray:
        """``values`` (grid shape) at points ``z`` (N, d), linearly interpolated (edges held)."""
        return map_coordinates(values, self.index_of(z).T, order=1, mode="nearest")

    def nearest(self, z: np.ndarray) -> np.ndarray:
        """Flat index of the grid point nearest each of ``z`` (N, d)."""
        idx = np.clip(np.rint(self.index_of(z)).astype(int), 0, np.array(self.shape) - 1)
        return np.ravel_multi_index(tuple(idx.T), self.shape)


def make_grid(z: np.ndarray, std: np.ndarray | None, n_per_axis: int | None = None) -> Grid:
    """A grid over the latents' 0.5-99.5 % range, widened by 3 median uncertainties (or 5 % of the range)."""
    d = z.shape[1]
    if d > MAX_GRID_DIMS:
        raise ValueError(f"a landscape grid in {d} dimensions is too large: reduce the latents to at most "
                         f"{MAX_GRID_DIMS} principal components first (--dims)")
    n = n_per_axis or DEFAULT_GRID[d]
    lo, hi = np.percentile(z, 0.5, axis=0), np.percentile(z, 99.5, axis=0)
    pad = 3 * np.median(std, axis=0) if std is not None else 0.05 * (hi - lo)
    pad = np.maximum(pad, 0.05 * (hi - lo) + 1e-9)
    return Grid([np.linspace(lo[k] - pad[k], hi[k] + pad[k], n) for k in range(d)])


def _kernel(z: torch.Tensor, var: torch.Tensor, grid_pts: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Gaussian likelihood of latents ``z`` (n, d) with variances ``var`` (n, d) (at least ``floor`` (d,)) at grid
    points (G, d) -> (n, G), each row scaled by its maximum (a constant per particle that EM does not see)."""
    v = torch.maximum(var, floor)
    d2 = (((z[:, None, :] - grid_pts[None]) ** 2) / v[:, None, :]).sum(-1)
    logk = -0.5 * d2 - 0.5 * torch.log(v).sum(-1, keepdim=True)
    return torch.exp(logk - logk.max(dim=1, keepdim=True).values)


def _floor(grid: Grid, device) -> torch.Tensor:
    """Least latent variance: that of a uniform spread over one grid cell (the grid's own blur)."""
    return torch.as_tensor(grid.step**2 / 12.0, dtype=torch.float64, device=device)


def deconvolve(z: np.ndarray, var: np.ndarray, grid: Grid, smooth: float, iterations: int = 200,
               chunk: int = 4096, weights: np.ndarray | None = None, device: torch.device | str = "cpu"
               ) -> np.ndarray:
    """Density on ``grid`` (grid shape, sums to 1) whose blur by each particle's N(0, var_i) best explains ``z``:
    EM for the maximum-likelihood mixture with a smoothing step (a Gaussian of s.d. ``smooth``, latent units)
    after each update (EMS, Silverman et al. 1990), which keeps the estimate from collapsing onto spikes.
    ``weights`` per particle (e.g. bootstrap counts)."""
    from scipy.ndimage import gaussian_filter

    pts = torch.as_tensor(grid.points(), dtype=torch.float64, device=device)
    floor = _floor(grid, device)
    zt = torch.as_tensor(z, dtype=torch.float64, device=device)
    vt = torch.as_tensor(var, dtype=torch.float64, device=device)
    w = torch.ones(len(z), dtype=torch.float64, device=device) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64, device=device)
    w = w / w.sum()
    cache = [_kernel(zt[s:s + chunk], vt[s:s + chunk], pts, floor) for s in range(0, len(z), chunk)] \
        if len(z) * len(pts) <= 5e7 else None
    sigma_px = smooth / grid.step
    p = np.full(grid.shape, 1.0 / len(pts))
    for _ in range(iterations):
        pt = torch.as_tensor(p.ravel(), device=device)
        new = torch.zeros_like(pt)
        for c, s in enumerate(range(0, len(z), chunk)):
            K = cache[c] if cache is not None else _kernel(zt[s:s + chunk], vt[s:s + chunk], pts, floor)
            r = K * pt
            r = r / r.sum(1, keepdim=True).clamp_min(1e-300)
            new += (w[s:s + chunk, None] * r).sum(0)
        p = gaussian_filter(new.reshape(grid.shape).cpu().numpy(), sigma_px, mode="constant")
        p /= p.sum()
    return p


def held_out_loglik(z: np.ndarray, var: np.ndarray, grid: Grid, p: np.ndarray,
                    device: torch.device | str = "cpu") -> float:
    """Mean log-likelihood of latents ``z`` under density ``p`` blurred by their own uncertainty (grid cells as
    point masses)."""
    pts = torch.as_tensor(grid.points(), dtype=torch.float64, device=device)
    floor = _floor(grid, device)
    logp = torch.log(torch.as_tensor(p.ravel(), dtype=torch.float64, device=device).clamp_min(1e-300))
    total = 0.0
    for s in range(0, len(z), 4096):
        zt = torch.as_tensor(z[s:s + 4096], dtype=torch.float64, device=device)
        vt = torch.maximum(torch.as_tensor(var[s:s + 4096], dtype=torch.float64, device=device), floor)
        d2 = (((zt[:, None, :] - pts[None]) ** 2) / vt[:, None, :]).sum(-1)
        ll = torch.logsumexp(-0.5 * d2 + logp[None], dim=1) - 0.5 * torch.log(2 * torch.pi * vt).sum(-1)
        total += float(ll.sum())
    return total / len(z)


def choose_smoothing(z: np.ndarray, var: np.ndarray, grid: Grid, candidates: np.ndarray, folds: int = 3,
                     iterations: int = 80, seed: int = 0, device: torch.device | str = "cpu",
                     progress: Progress | None = None) -> tuple[float, np.ndarray]:
    """The smoothing of greatest held-out log-likelihood (``folds``-fold), and the score of every candidate."""
    fold = np.random.default_rng(seed).permutation(len(z)) % folds
    scores = np.zeros(len(candidates))
    steps = enumerate(candidates)
    for j, h in progress(steps, "choosing the smoothing", len(candidates)) if progress else steps:
        for f in range(folds):
            train, test = fold != f, fold == f
            p = deconvolve(z[train], var[train], grid, float(h), iterations, device=device)
            scores[j] += held_out_loglik(z[test], var[test], grid, p, device) / folds
    return float(candidates[int(np.argmax(scores))]), scores


def smoothing_candidates(grid: Grid, n: int = 6) -> np.ndarray:
    """Smoothing widths (latent units) from one grid step to a tenth of the grid's extent, geometric."""
    lo = float(grid.step.max())
    hi = max(0.1 * float(min(a[-1] - a[0] for a in grid.axes)), 2 * lo)
    return np.geomspace(lo, hi, n)


def bootstrap_free_energy(z: np.ndarray, var: np.ndarray, grid: Grid, smooth: float, n_boot: int,
                          iterations: int = 100, seed: int = 0, device: torch.device | str = "cpu",
                          progress: Progress | None = None) -> np.ndarray:
    """Standard deviation of G over ``n_boot`` bootstrap resamples of the particles (grid shape, kT)."""
    rng = np.random.default_rng([seed, 0xB007])
    resamples = range(n_boot)
    runs = [free_energy(deconvolve(z, var, grid, smooth, iterations, device=device,
                                   weights=np.bincount(rng.integers(0, len(z), len(z)), minlength=len(z))))
            for _ in (progress(resamples, "bootstrap", n_boot) if progress else resamples)]
    return np.std(runs, axis=0, ddof=1) if n_boot > 1 else np.zeros(grid.shape)


@dataclass
class Landscape:
    """A fitted landscape: density and free energy (kT) with its bootstrap s.d. on ``grid``."""

    grid: Grid
    smooth: float              # the chosen smoothing (latent units)
    candidates: np.ndarray     # the smoothings tried
    scores: np.ndarray         # their held-out log-likelihoods
    density: np.ndarray
    G: np.ndarray
    G_std: np.ndarray


def fit_landscape(z: np.ndarray, var: np.ndarray | None, n_per_axis: int | None = None, bootstrap: int = 10,
                  seed: int = 0, device: torch.device | str = "cpu", progress: Progress | None = None) -> Landscape:
    """Grid, smoothing by held-out likelihood, deconvolved density, free energy and its bootstrap s.d. of latents
    ``z`` (N, d) with variances ``var`` (N, d; None: latents taken as exact)."""
    exact = var is None
    var = np.zeros_like(z) if exact else var
    grid = make_grid(z, None if exact else np.sqrt(var), n_per_axis)
    cands = smoothing_candidates(grid)
    smooth, scores = choose_smoothing(z, var, grid, cands, seed=seed, device=device, progress=progress)
    p = deconvolve(z, var, grid, smooth, device=device)
    G_std = bootstrap_free_energy(z, var, grid, smooth, bootstrap, seed=seed, device=device, progress=progress)
    return Landscape(grid, smooth, cands, scores, p, free_energy(p), G_std)


def free_energy(p: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """G = −log p in kT, zero at the minimum (densities below ``floor`` × the maximum are held there)."""
    q = np.maximum(p, floor * p.max())
    return -np.log(q / q.max())


def local_minima(G: np.ndarray, max_G: float = np.inf, n: int = 10) -> np.ndarray:
    """Flat indices of up to ``n`` grid points that are the lowest in their 5-point neighbourhood, lowest first."""
    low = (G == minimum_filter(G, size=5, mode="nearest")) & (G <= max_G)
    idx = np.flatnonzero(low.ravel())
    return idx[np.argsort(G.ravel()[idx])][:n]


def minimum_free_energy_path(G: np.ndarray, grid: Grid, start: int, end: int) -> np.ndarray:
    """Grid points (M, d) of the path from flat index ``start`` to ``end`` that minimises ∫ exp(G) ds over the
    grid's neighbour graph (steps to the 3^d − 1 neighbours)."""
    shape, d = G.shape, G.ndim
    flat = np.arange(G.size).reshape(shape)
    step = grid.step
    rows, cols, costs = [], [], []
    for off in np.ndindex(*(3,) * d):
        o = np.array(off) - 1
        if not o.any():
            continue
        src = tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(o, shape, strict=True))
        dst = tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(o, shape, strict=True))
        length = float(np.linalg.norm(o * step))
        rows.append(flat[src].ravel())
        cols.append(flat[dst].ravel())
        costs.append(length * 0.5 * (np.exp(G[src]) + np.exp(G[dst])).ravel())
    graph = coo_matrix((np.concatenate(costs), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(G.size, G.size)).tocsr()
    _, pred = dijkstra(graph, indices=start, return_predecessors=True)
    if pred[end] < 0 and end != start:
        raise ValueError("no path between the two points on the grid")
    path = [end]
    while path[-1] != start:
        path.append(int(pred[path[-1]]))
    return grid.points()[np.array(path[::-1])]


def resample_path(path: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along the polyline ``path`` (M, d)."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] == 0:
        return np.repeat(path[:1], n, axis=0)
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, path[:, k]) for k in range(path.shape[1])], axis=1)
