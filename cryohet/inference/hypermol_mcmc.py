"""Hyper-molecule inference (survey section 7.1): each particle's τ sampled by batched Metropolis MCMC, the shared
basis coefficients by per-voxel least squares over the samples (Monte Carlo EM).

Image model for particle i (centred transform y_i, origin undone, Fourier-cropped to the working box):

    y_i = c_i · Σ_l P_l(τ_i) S_l(R_i) + n_i,    τ_i ~ U(−1, 1),    n_i ~ N(0, σ²(shell)) per pixel,

with S_l the central slices of the coefficient maps M_l (``models.hypermolecule``) at the particle's pose and P_l the
orthonormal Legendre polynomials. With G = c S, the log-likelihood of τ is a quadratic in p(τ):

    log p(y | τ) = p(τ)ᵀ h − ½ p(τ)ᵀ H p(τ) + const,   H = Re Gᴴ Ω G,   h = Re Gᴴ Ω y   (Ω = 1/σ², both mates)

so once a batch's L slices are made a Metropolis step costs O(L²) per particle and many steps per visit are cheap.
The fit starts from principal volumes with one component (``ppca``): the mean, the component scaled to τ's range,
and chains ordered by the rank of each particle's coordinate (a random start falls into folded paths). Each visit
(Metropolis-within-Gibbs: τ given the coefficients) runs ``n_steps`` steps of a random walk reflected at ±1 (its
width the last visit's posterior s.d. × 2.4, per particle); the chain state (τ, step) of every particle lives in a
memory-mapped file, so memory does not grow with the number of particles. The prior of τ is uniform through the
``warmup`` iterations (degree 1), then a histogram of the chains' states mixed with the uniform density (empirical
Bayes). The M-step solves the L×L normal equations per Fourier voxel with E[p], E[p pᵀ] over the samples
(``ppca.MapEquations``, the per-shell prior of principal volumes with the mean's signal power fixed from the first
pass, stronger for higher degrees: ``smoothness_scale``);
σ² per shell comes from the expected residuals. The degree grows by one every two iterations after the warm-up, and
after each M-step τ is re-scaled exactly when the chains no longer fill [−1, 1] (an affine map taking their
1st-99th percentile range to ±0.98, the maps re-expanded in the new τ's Legendre basis). The final pass runs
``n_chains`` chains per particle (the stored state and uniform random starts, with independent uniform proposals,
``jump_prob``, that cross between modes) and writes the posterior mean, s.d., 5 % and 95 % quantiles and ``n_keep``
thinned samples of every particle to memory-mapped files.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.geometry.fourier import centered_coords, fourier_resize_3d
from cryohet.geometry.lattice import Lattice, box_for_resolution
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import ProjectorStack, slice_coords
from cryohet.inference.em_state import EMState, load_state, save_state
from cryohet.inference.ppca import (
    ImageSource,
    MapEquations,
    ProgressFn,
    fit_principal_volumes,
    signal_power,
    solve_maps,
)
from cryohet.models.hypermolecule import affine_legendre_transform, legendre_basis

HYPERMOL_FORMAT = "cryohet-hypermolecule-checkpoint-1"
MIN_PARTICLES = 50
#: bytes per kept Fourier voxel and accumulator channel of the M-step (float32 sums, two float64 copies to solve)
BYTES_PER_CHANNEL = 20
#: posterior columns written per particle: mean, s.d., 5 % and 95 % quantiles
POSTERIOR_COLUMNS = ("mean", "sd", "q05", "q95")
#: the learned prior of τ: histogram bins on [−1, 1] and the weight of the uniform density mixed in
PRIOR_BINS, PRIOR_FLOOR = 20, 0.2
#: EM iterations of the one-component principal volumes that start the fit
PCA_ITERATIONS = 8


@dataclass
class MCMCOptions:
    """Sampler settings: steps per particle per EM visit, and the final pass's chains, burn-in and samples."""

    n_steps: int = 40
    n_chains: int = 4
    burn_in: int = 100
    final_steps: int = 200
    n_keep: int = 16
    jump_prob: float = 0.1


@dataclass
class HyperFit:
    """Result of ``fit_hypermolecule``: coefficient maps at the working box and where the posterior went."""

    maps: np.ndarray               # (L, n, n, n) float32
    noise_var: np.ndarray          # (shells,) σ² per shell of the working box
    work_box: int
    work_apix: float
    resolution_A: float
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    last_change: float = math.nan
    tol: float = 0.0
    acceptance: float = math.nan   # Metropolis acceptance rate of the final pass


def memory_bytes(work_box: int, radius_px: float, degree: int, pad: int = 2) -> int:
    """Bytes of the M-step's accumulators for ``degree`` + 1 maps inside a ``radius_px`` sphere at ``work_box``."""
    L = degree + 1
    channels = 2 * L + L * (L + 1) // 2 + L
    voxels = 4 / 3 * math.pi * (pad * (radius_px + 1.5)) ** 3
    return int(voxels * channels * BYTES_PER_CHANNEL + 4 * L * (pad * work_box) ** 3 * 8)


def work_lattice(box: int, apix: float, resolution_A: float, source: Any = None) -> tuple[Lattice, float]:
    """The working lattice (images Fourier-cropped to the resolution) and the band limit's radius in its pixels;
    InputError when ``resolution_A`` is beyond Nyquist."""
    if resolution_A < 0 or 0 < resolution_A < 2 * apix * (1 - 1e-6):
        raise InputError(source, f"--resolution_A {resolution_A:g} Å is beyond Nyquist of the particles "
                                 f"({2 * apix:.3f} Å at {apix:.3f} Å/pixel); use 0 for Nyquist or a larger value")
    lattice = Lattice(box, apix).cropped(box_for_resolution(box, apix, resolution_A))
    n = lattice.box
    radius = n // 2 - 1 if resolution_A <= 0 else min(n // 2 - 1, n * lattice.apix / resolution_A)
    return lattice, float(radius)


def check_inputs(n_particles: int, box: int, apix: float, degree: int, resolution_A: float, max_memory_gb: float,
                 source: Any = None) -> None:
    """InputError for too few particles, a limit beyond Nyquist or a basis whose M-step needs more than
    ``max_memory_gb``."""
    if n_particles < MIN_PARTICLES:
        raise InputError(source, f"only {n_particles} particles: the hyper-molecule needs at least {MIN_PARTICLES}")
    lattice, radius = work_lattice(box, apix, resolution_A, source)
    need = memory_bytes(lattice.box, radius, degree)
    if need > max_memory_gb * 2**30:
        raise InputError(source, f"the basis is too large for memory: degree {degree} ({degree + 1} maps) at a "
                                 f"working box of {lattice.box} px needs {need / 2**30:.1f} GiB for the M-step, more "
                                 f"than --max_memory_gb {max_memory_gb:g}; lower --degree or raise --resolution_A")


def quadratic_terms(G: torch.Tensor, y: torch.Tensor, omega_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = Re Gᴴ Ω G (B, L, L) and h = Re Gᴴ Ω y (B, L), float64, for slices with CTF ``G`` (B, L, p), data ``y``
    (B, p) and per-pixel weights ``omega_w`` (p,) (1/σ² times the pixel's multiplicity on the full plane)."""
    Gw = G * omega_w
    H = torch.einsum("bkp,blp->bkl", Gw.conj(), G).real.double()
    h = torch.einsum("bkp,bp->bk", Gw.conj(), y).real.double()
    return 0.5 * (H + H.transpose(1, 2)), h


def log_likelihood(tau: torch.Tensor, H: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """p(τ)ᵀ h − ½ p(τ)ᵀ H p(τ) at ``tau`` (B, C) for each particle's (H, h) -> (B, C) float64."""
    p = legendre_basis(tau.double(), h.shape[1] - 1)
    return torch.einsum("bcl,bl->bc", p, h) - 0.5 * torch.einsum("bcl,blm,bcm->bc", p, H, p)


def reflect(tau: torch.Tensor) -> torch.Tensor:
    """``tau`` folded into [−1, 1] by reflection at the ends (keeps a symmetric proposal symmetric)."""
    x = torch.remainder(tau + 1, 4)
    return torch.where(x > 2, 4 - x, x) - 1


def tau_prior(states: np.ndarray, n_bins: int = PRIOR_BINS, floor: float = PRIOR_FLOOR) -> torch.Tensor:
    """Log-density table (n_bins,) of τ on [−1, 1]: the histogram of the chains' ``states`` smoothed by [¼, ½, ¼]
    and mixed with the uniform density (weight ``floor``) so that no region is ever closed to the chains."""
    counts = np.histogram(np.asarray(states, dtype=np.float64), bins=n_bins, range=(-1, 1))[0].astype(np.float64)
    counts = np.convolve(np.pad(counts, 1, mode="edge"), [0.25, 0.5, 0.25], "valid")
    p = (1 - floor) * counts / max(counts.sum(), 1.0) + floor / n_bins
    return torch.log(torch.as_tensor(p * n_bins / 2))


def log_prior_at(tau: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor | float:
    """The log-density ``table`` (``tau_prior``; None: uniform) at ``tau``."""
    if table is None:
        return 0.0
    idx = ((tau + 1) / 2 * len(table)).long().clamp(0, len(table) - 1)
    return table.to(tau.device)[idx]


def metropolis(tau: torch.Tensor, step: torch.Tensor, H: torch.Tensor, h: torch.Tensor, n_steps: int,
               jump_prob: float, gen: torch.Generator, record_from: int = 0, prior: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, float]:
    """Run ``n_steps`` Metropolis steps of chains ``tau`` (B, C) (random walk of width ``step`` (B, 1), reflected
    at ±1, or with probability ``jump_prob`` a uniform draw) under the log-density table ``prior`` (None: uniform)
    -> the states from step ``record_from`` on (B, C, n_steps − record_from) and the acceptance rate."""
    def target(t: torch.Tensor) -> torch.Tensor:
        return log_likelihood(t, H, h) + log_prior_at(t, prior)

    ll = target(tau)
    kept, accepted = [], 0.0
    dev = tau.device
    for s in range(n_steps):
        noise = torch.randn(tau.shape, generator=gen, dtype=tau.dtype).to(dev)
        u = torch.rand((3,) + tau.shape, generator=gen, dtype=tau.dtype).to(dev)
        prop = torch.where(u[0] < jump_prob, 2 * u[1] - 1, reflect(tau + step * noise))
        ll_p = target(prop)
        take = torch.log(u[2].double()) < ll_p - ll
        tau = torch.where(take, prop, tau)
        ll = torch.where(take, ll_p, ll)
        accepted += float(take.double().mean())
        if s >= record_from:
            kept.append(tau)
    return torch.stack(kept, -1), accepted / max(n_steps, 1)


def sample_moments(samples: torch.Tensor, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[p] (B, L) and E[p pᵀ] (B, L, L) over the samples (B, C, S) of each particle, float64."""
    p = legendre_basis(samples.double().reshape(len(samples), -1), degree)      # (B, CS, L)
    return p.mean(1), torch.einsum("bsl,bsm->blm", p, p) / p.shape[1]


class ChainState:
    """Every particle's chain state (τ, random-walk width) in a memory-mapped file (created from ``start``, else
    uniform at random)."""

    def __init__(self, path: Path, n_particles: int, seed: int, log: logging.Logger, start: np.ndarray | None = None):
        shape = (n_particles, 2)
        arr = None
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r+")
            except (OSError, ValueError):
                arr = None
            if arr is not None and (arr.shape != shape or not np.isfinite(arr).all()):
                arr = None
            if arr is None:
                log.warning("%s is not a usable chain state: the chains start again", path)
        if arr is None:
            rng = np.random.default_rng(seed)
            with atomic_path(path) as tmp:
                new = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                new[:, 0] = rng.uniform(-1, 1, n_particles) if start is None else start
                new[:, 1] = 0.5
                new.flush()
                del new
            arr = np.load(path, mmap_mode="r+")
        self.arr = arr

    def get(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(np.asarray(self.arr[rows]), device=device)
        return s[:, :1].double(), s[:, 1:].double()

    def put(self, rows: np.ndarray, tau: torch.Tensor, step: torch.Tensor) -> None:
        self.arr[rows, 0] = tau.cpu().numpy()
        self.arr[rows, 1] = step.cpu().numpy()

    def rescale(self, scale: float, offset: float) -> None:
        """τ_new = (τ − offset)/scale for every chain (the model was re-expressed in τ_new)."""
        for s in range(0, len(self.arr), 1 << 16):
            blk = self.arr[s:s + (1 << 16)]
            blk[:, 0] = np.clip((blk[:, 0] - offset) / scale, -1, 1)
            blk[:, 1] = np.clip(blk[:, 1] / scale, 1e-3, 1.0)
        self.arr.flush()


class PosteriorWriter:
    """Memory-mapped (N, 4) summaries (``POSTERIOR_COLUMNS``) and (N, n_keep) samples, renamed into place when
    complete."""

    def __init__(self, stack: ExitStack, summary: Path, samples: Path, n: int, n_keep: int):
        self.summary = np.lib.format.open_memmap(stack.enter_context(atomic_path(summary)), mode="w+",
                                                 dtype=np.float32, shape=(n, len(POSTERIOR_COLUMNS)))
        self.samples = np.lib.format.open_memmap(stack.enter_context(atomic_path(samples)), mode="w+",
                                                 dtype=np.float32, shape=(n, n_keep))
        self.n_keep = n_keep

    def put(self, rows: np.ndarray, samples: torch.Tensor) -> None:
        flat = samples.reshape(len(samples), -1).double()
        q = torch.quantile(flat, torch.tensor([0.05, 0.95], dtype=flat.dtype, device=flat.device), dim=1).T
        self.summary[rows] = torch.stack([flat.mean(1), flat.std(1), q[:, 0], q[:, 1]], 1).cpu().numpy()
        pick = torch.linspace(0, flat.shape[1] - 1, self.n_keep, device=flat.device).round().long()
        self.samples[rows] = flat[:, pick].cpu().numpy()

    def close(self) -> None:
        self.summary.flush()
        self.samples.flush()
        del self.summary, self.samples


def _progress_default(items: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    return items


class _Fitter:
    """One fit's lattice, image source, masks and the passes over the data."""

    def __init__(self, particles: Any, resolution_A: float, batch_size: int, pad: int, device: torch.device,
                 cache_mb: float, progress: ProgressFn):
        lattice, self.radius = work_lattice(int(particles.box), float(particles.apix), resolution_A,
                                            getattr(particles, "source", None))
        self.n, self.apix, self.pad = lattice.box, lattice.apix, pad
        self.src = ImageSource(particles, lattice, self.radius, batch_size, device, cache_mb)
        self.device, self.progress = device, progress
        n = self.n
        self.mask = sphere_mask(n, n / 2 - max(1.0, n / 16), max(1.0, n / 16), device=device)
        c3 = centered_coords(pad * n, device, torch.float64) / pad
        self.limit = ((c3[:, None, None] ** 2 + c3[None, :, None] ** 2 + c3[None, None, :] ** 2)
                      <= self.radius ** 2).double()

    def shell_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.src.n_shells, dtype=torch.float64, device=self.device).index_add_(
            0, self.src.shell, values.double())

    def visit(self, maps: torch.Tensor, noise: torch.Tensor, chains: ChainState, opts: MCMCOptions,
              gen: torch.Generator, desc: str, prior: torch.Tensor | None, final: PosteriorWriter | None = None
              ) -> tuple[MapEquations | None, torch.Tensor, dict[str, float]]:
        """One pass: every particle's chain advanced (or, ``final``, its posterior sampled and written), the
        M-step's equations (None when ``final``), σ² per shell of the expected residuals and pass statistics."""
        L = len(maps)
        acc = None if final is not None else MapEquations(self.n, self.pad, self.radius, L, self.device)
        stack = ProjectorStack(maps, self.pad)
        w = self.src.weight
        omega_w = (w / noise[self.src.shell]).to(torch.float32)
        res = torch.zeros(self.src.n_shells, dtype=torch.float64, device=self.device)
        cnt = torch.zeros_like(res)
        acc_rate, n_seen, ll_sum = 0.0, 0, 0.0
        for b in self.progress(self.src.batches(), desc, self.src.n_batches()):
            B = len(b.rows)
            G = stack.slice_points(b.rotations, self.src.points.kxy).transpose(0, 1) * b.ctf[:, None, :]  # (B, L, p)
            H, h = quadratic_terms(G, b.images_ft, omega_w)
            tau, step = chains.get(b.rows, self.device)
            if final is None:
                samples, rate = metropolis(tau, step, H, h, opts.n_steps, 0.0, gen, prior=prior)
            else:
                starts = torch.cat([tau, 2 * torch.rand((B, opts.n_chains - 1), generator=gen,
                                                        dtype=torch.float64).to(self.device) - 1], 1)
                samples, rate = metropolis(starts, step, H, h, opts.burn_in + opts.final_steps, opts.jump_prob, gen,
                                           record_from=opts.burn_in, prior=prior)
                final.put(b.rows, samples)
            sd = samples.reshape(B, -1).std(1)
            chains.put(b.rows, samples[:, 0, -1], (2.4 * sd).clamp(1e-3, 1.0))
            Ep, Epp = sample_moments(samples, L - 1)
            ll_sum += float(log_likelihood(samples[:, :, -1], H, h).mean(1).sum())
            cov = Epp - Ep[:, :, None] * Ep[:, None, :]
            resid = b.images_ft - torch.einsum("bl,blp->bp", Ep.to(G.dtype), G)
            var_term = torch.einsum("bkp,blp,bkl->bp", G.conj(), G, cov.to(G.dtype)).real
            res += self.shell_sum(((resid.abs() ** 2 + var_term) * w).sum(0))
            cnt += self.shell_sum(w.double() * B)
            acc_rate += rate * B
            n_seen += B
            if acc is not None:
                pos = slice_coords(b.rotations, self.n, self.pad).reshape(B, -1, 3)[:, self.src.flat]
                acc.insert(pos, 0.5 * w, b.images_ft, b.ctf, (1.0 / noise[self.src.shell]).to(torch.float32),
                           Ep, Epp)
        stats = {"acceptance": acc_rate / n_seen, "mean_log_likelihood": ll_sum / n_seen}
        return acc, (res / cnt.clamp_min(1)).clamp_min(1e-30), stats


def degree_at(iteration: int, warmup: int, degree: int) -> int:
    """The degree fitted at EM ``iteration`` (1-based): 1 through the warm-up, then one more every 2 iterations."""
    return min(degree, 1 + max(0, math.ceil((iteration - warmup) / 2)))


def smoothness_scale(degree: int, smoothness: float) -> torch.Tensor:
    """Prior precision multipliers of the maps l = 0..degree: 1 + smoothness·((l(l+1)/2)² − 1) for l ≥ 1 (a
    penalty growing as the squared eigenvalue of the Legendre operator, so the curve V(τ) bends only where the
    data ask), 1 for the mean."""
    deg = torch.arange(degree + 1, dtype=torch.float64)
    return torch.where(deg >= 1, 1 + smoothness * ((deg * (deg + 1) / 2) ** 2 - 1), torch.ones_like(deg))


def _pca_start(particles: Any, fit: _Fitter, degree: int, resolution_A: float, batch_size: int, seed: int,
               cache_mb: float, progress: ProgressFn, log: logging.Logger
               ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The starting point from principal volumes with one component (``ppca``): maps (the mean, the component
    scaled so that τ in [−1, 1] spans the coordinates' 1st-99th percentiles, zeros for l ≥ 2), σ² per shell and
    each particle's τ, its coordinate's rank mapped to [−1, 1] (so that the chains start uniform and ordered)."""
    pv = fit_principal_volumes(particles, 1, resolution_A=resolution_A, max_iter=PCA_ITERATIONS, batch_size=batch_size,
                               mean="joint", device=fit.device, seed=seed, cache_mb=cache_mb, progress=progress,
                               log=log)  # only the coordinates are used: the one-fit estimator
    b = pv.latents[:, 0]
    lo, hi = np.percentile(b, [1, 99])
    maps = torch.zeros((degree + 1,) + (fit.n,) * 3, dtype=torch.float32, device=fit.device)
    maps[0] = fourier_resize_3d(torch.as_tensor(pv.mean), fit.n).to(fit.device)
    maps[1] = fourier_resize_3d(torch.as_tensor(pv.components[0]), fit.n).to(fit.device) * (hi - lo) / 2 / math.sqrt(3)
    tau = (2 * (np.argsort(np.argsort(b)) + 0.5) / len(b) - 1).astype(np.float32)
    noise = torch.as_tensor(pv.noise_var, dtype=torch.float64, device=fit.device).clamp_min(1e-30)
    return maps, noise, tau


def _rescale(maps: torch.Tensor, chains: ChainState, log: logging.Logger) -> None:
    """The exact affine re-parametrisation of τ that takes the chains' 1st-99th percentile range to ±0.98."""
    lo, hi = np.percentile(np.asarray(chains.arr[:, 0]), [1, 99])
    scale, offset = max((hi - lo) / 1.96, 1e-3), (hi + lo) / 2
    if 0.9 < scale < 1.1 and abs(offset) < 0.05:
        return
    T = torch.as_tensor(affine_legendre_transform(len(maps) - 1, scale, offset), dtype=torch.float64,
                        device=maps.device)
    maps.copy_(torch.einsum("kl,kxyz->lxyz", T, maps.double()).float())
    chains.rescale(scale, offset)
    log.info("τ re-scaled: chains' range [%.3f, %.3f] -> ±0.98", lo, hi)


def fit_hypermolecule(particles: Any, degree: int, *, resolution_A: float, iterations: int, warmup: int = 5,
                      tol: float = 1e-3, regularisation: float = 1.0, smoothness: float = 1.0,
                      mcmc: MCMCOptions | None = None,
                      out_dir: str | Path, batch_size: int = 256, pad: int = 2, device: torch.device | str = "cpu",
                      seed: int = 0, cache_mb: float = 1024.0, max_memory_gb: float = 8.0,
                      progress: ProgressFn | None = None, log: logging.Logger | None = None,
                      resume: bool = False) -> HyperFit:
    """Fit the hyper-molecule of ``degree`` in τ to ``particles`` (poses and CTF) by Monte Carlo EM, then sample
    every particle's posterior of τ into ``out_dir``/tau_posterior.npy (N, 4: ``POSTERIOR_COLUMNS``) and
    tau_samples.npy (N, n_keep).

    ``iterations``: most EM passes (the first ``warmup`` at degree 1 with τ re-scaled after each); stops earlier when
    the relative change of the maps falls below ``tol``. A checkpoint (``out_dir``/checkpoint.safetensors) is
    written after each pass and the chains' state lives in ``out_dir``/mcmc_state.npy; ``resume`` continues from
    them (the chains continue from their stored states, so the result is a valid, not an identical, run).
    """
    log = log or logging.getLogger("cryohet.hypermolecule")
    progress = progress or _progress_default
    device = torch.device(device)
    mcmc = mcmc or MCMCOptions()
    out = Path(out_dir)
    n_part = len(particles.euler_deg)
    source = getattr(particles, "source", None)
    check_inputs(n_part, int(particles.box), float(particles.apix), degree, resolution_A, max_memory_gb, source)
    fit = _Fitter(particles, resolution_A, batch_size, pad, device, cache_mb, progress)
    res_used = fit.n * fit.apix / fit.radius
    log.info("hyper-molecule: %d particles, working box %d (%.2f Å/px), limit %.2f Å, degree %d in τ",
             n_part, fit.n, fit.apix, res_used, degree)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    settings = {"n_particles": n_part, "box": int(particles.box), "apix": round(float(particles.apix), 6),
                "degree": degree, "work_box": fit.n, "radius_px": round(fit.radius, 6), "pad": pad,
                "regularisation": regularisation, "smoothness": smoothness, "warmup": warmup}
    ckpt = out / "checkpoint.safetensors"
    found = load_state(ckpt, settings, log, HYPERMOL_FORMAT) if resume else None
    if found is not None:
        chains = ChainState(out / "mcmc_state.npy", n_part, seed, log)  # the stored chains when usable
        used, state = found
        maps, noise, history = state.vols.to(device), state.noise.to(device), state.history
        power = state.extra["power"].to(device) if "power" in state.extra else None
        log.info("resuming from %s after EM iteration %d", used, state.iteration)
    else:
        maps, noise, tau0 = _pca_start(particles, fit, degree, resolution_A, batch_size, seed, cache_mb, progress, log)
        (out / "mcmc_state.npy").unlink(missing_ok=True)
        chains, history, power = ChainState(out / "mcmc_state.npy", n_part, seed, log, tau0), [], None
    done = len(history)
    if done and history[-1].get("converged"):
        done = iterations
    for it in range(done + 1, iterations + 1):
        ti = time.time()
        L = 1 + degree_at(it, warmup, degree)
        prior = None if it <= warmup else tau_prior(chains.arr[:, 0])
        acc, new_noise, stats = fit.visit(maps[:L], noise, chains, mcmc, gen, f"hyper-molecule: EM {it}/{iterations}",
                                          prior)
        new = torch.zeros_like(maps)
        if power is None:  # the mean's signal power per shell, fixed from the first pass (no feedback through τ²)
            power = signal_power(acc, fit.radius)
        new[:L] = solve_maps(acc, fit.radius, fit.limit, regularisation, "mean", fit.mask,
                             prior_scale=smoothness_scale(L - 1, smoothness), mean_power=power)
        del acc
        change = float((new - maps).norm() / new.norm().clamp_min(1e-30))
        maps, noise = new, new_noise
        if it <= warmup:
            _rescale(maps[:L], chains, log)
        converged = L - 1 == degree and it > warmup + 1 and change < tol
        history.append({"iteration": it, "map_change": change, "seconds": time.time() - ti, "degree": L - 1,
                        "converged": converged, **stats})
        log.info("EM %d (degree %d): map change %.2e, acceptance %.2f, mean log-likelihood %.4g, %.1f s", it, L - 1,
                 change, stats["acceptance"], stats["mean_log_likelihood"], time.time() - ti)
        save_state(ckpt, EMState(maps, noise, it, history, {"power": power}), settings, HYPERMOL_FORMAT)
        if converged:
            break
    with ExitStack() as stack:
        writer = PosteriorWriter(stack, out / "tau_posterior.npy", out / "tau_samples.npy", n_part, mcmc.n_keep)
        prior = tau_prior(chains.arr[:, 0]) if len(history) > warmup else None
        _, noise_final, stats = fit.visit(maps, noise, chains, mcmc, gen, "hyper-molecule: posterior", prior, writer)
        writer.close()
    last = history[-1] if history else {}
    return HyperFit(maps=maps.cpu().numpy(), noise_var=noise_final.cpu().numpy(), work_box=fit.n, work_apix=fit.apix,
                    resolution_A=float(res_used), history=history, converged=bool(last.get("converged", False)),
                    last_change=float(last.get("map_change", math.nan)), tol=tol,
                    acceptance=stats["acceptance"])
