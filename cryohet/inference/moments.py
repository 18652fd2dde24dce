"""Method of moments, poses known (survey section 8; Katsevich, Kogan & Singer 2015, Andén & Singer 2018): the mean
and the covariance of the 3-D volumes from the first and second moments of the images, then principal volumes.

Basis: the volumes band-limited to the resolution limit, given by their voxel values x ∈ R^d on the box n they are
Fourier-cropped to, inside a ball (a Fourier basis: the values of a trigonometric polynomial of degree n / 2). The
transform of particle m's image at its half-plane pixels k_p (cycles/pixel) inside the resolution circle is then,
exactly (no interpolation), with A_m its RELION rotation and c_m its CTF,

    y_m(k_p) = c_m(k_p) Σ_j x_m,j exp(−2πi (A_mᵀ k_p) · r_j) + n_m(k_p).

Real and imaginary parts stacked and whitened (pixel weights w_p / σ², w_p = 2 for a pixel standing for its Friedel
mate and 1 for the zero frequency, σ² the white noise variance of the transforms from the images' corners), this is
y_m = Q_m x_m + n_m with n_m ~ N(0, I). With M_m = Q_mᵀ Q_m and b_m = Q_mᵀ (y_m − Q_m μ), E[b_m b_mᵀ] = M_m Σ M_m +
M_m, so the least-squares mean and Andén & Singer's normal equations of the covariance are

    (Σ_m M_m + λ_μ I) μ = Σ_m Q_mᵀ y_m,
    (1/N) Σ_m M_m Σ M_m + λ Σ = (1/N) Σ_m (b_m b_mᵀ − M_m),

the second solved by conjugate gradient on symmetric d × d matrices, preconditioned by the exact inverse of
X ↦ M̄ X M̄ + λ X (M̄ the mean of the M_m). Each application of the operator is one pass over the particles in
batches (cost ~4 r d² per particle, r the number of real measurements per image), so memory does not grow with
N. The top eigenvectors of Σ, taken to maps at the particles' box, are the principal volumes; each particle's
coordinates are their Wiener (posterior-mean) estimates from its image.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.data.prepare import ImageBatch, sample_rows
from cryohet.device import refuse_unless_fits
from cryohet.errors import InputError
from cryohet.geometry.fourier import centered_coords, fft3c, ifft3c
from cryohet.geometry.lattice import Lattice, box_for_resolution
from cryohet.inference.em_state import load_checkpoint
from cryohet.inference.moments_state import CGState, read_cg_state, save_cg_state
from cryohet.inference.ppca import ImageSource, band_limit, fourier_pad_3d

#: Largest basis (voxels in the ball) accepted: Σ has d² entries and each CG step costs ~4 r d² per particle.
MAX_BASIS = 6000
#: Fewest particles accepted.
MIN_PARTICLES = 50
#: Fraction of the device's free memory the estimator may plan to use.
MEMORY_FRACTION = 0.8
#: Particles whose corners give the noise variance.
NOISE_SAMPLE = 2000
#: Eigenvalue shrinkers of the whitened second moment (``shrink_rhs``).
SHRINKERS = ("none", "operator", "frobenius")

ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]


@dataclass
class MomentsResult:
    """Result of ``fit_moments``; maps at the particles' box and pixel size."""

    mean_basis: np.ndarray         # (box,)*3 float32: the least-squares mean in the basis, band-limited
    components: np.ndarray         # (K, box, box, box) float32, orthonormal principal volumes
    eigenvalues: np.ndarray        # (K,) variance along each (map units² · voxels, as ||X_k|| = 1)
    spectrum: np.ndarray           # (d,) eigenvalues of the estimated Σ in the basis, descending
    latents: np.ndarray            # (N, K) Wiener coordinates b_k, particle order
    latent_std: np.ndarray         # (N, K) their posterior s.d.
    noise_var: float               # σ² of the working-box transforms (white, from the corners)
    work_box: int
    basis_size: int                # d
    resolution_A: float
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool = False
    last_change: float = math.nan  # relative CG residual at the end
    tol: float = 0.0
    iterations: int = 0


def ball_mask(n: int, radius_px: float, device: torch.device
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Voxels of the (n, n, n) grid within ``radius_px`` of its centre (flat, bool) and the coordinates x, y, z."""
    c = centered_coords(n, device, torch.float32)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return (x ** 2 + y ** 2 + z ** 2 <= radius_px ** 2).flatten(), (x, y, z)


class BallBasis:
    """Band-limited functions concentrated in a ball (discrete prolate spheroidal functions): the eigenvectors Φ
    (d, d') of the Gram matrix of the ball's voxels low-passed to the resolution sphere, with eigenvalue (the
    fraction of the function's norm inside the band) above ``concentration``. Coefficients c ∈ R^d' stand for the
    voxel values Φ c of the working box; ``norms`` (d',) are those eigenvalues, the squared norm of each
    band-limited basis function (working-box voxels), so ||map(c)||² = (N / n)³ Σ norms c²."""

    def __init__(self, n: int, ball_px: float, band_px: float, device: torch.device, concentration: float = 0.5,
                 chunk: int = 256):
        inside, (x, y, z) = ball_mask(n, ball_px, device)
        self.n = n
        self.flat = torch.nonzero(inside).squeeze(1)
        self.xyz = torch.stack([x.flatten(), y.flatten(), z.flatten()], 1)[self.flat]   # (d, 3) voxels from centre
        d = len(self.flat)
        band = (x ** 2 + y ** 2 + z ** 2 <= band_px ** 2).to(torch.complex128)
        gram = torch.zeros((d, d), dtype=torch.float64, device=device)
        for s in range(0, d, chunk):
            cols = torch.arange(s, min(d, s + chunk), device=device)
            grid = torch.zeros((len(cols), n ** 3), dtype=torch.float64, device=device)
            grid[torch.arange(len(cols), device=device), self.flat[cols]] = 1.0
            low = ifft3c(fft3c(grid.reshape(-1, n, n, n)) * band).real.reshape(len(cols), -1)
            gram[:, cols] = low[:, self.flat].T
        evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
        keep = torch.nonzero(evals > concentration).squeeze(1).flip(0)
        self.phi = evecs[:, keep].to(torch.float32)                      # (d, d')
        self.norms = evals[keep]                                         # (d',)

    @property
    def voxels(self) -> int:
        return len(self.flat)

    def __len__(self) -> int:
        return self.phi.shape[1]

    def forward(self, A: torch.Tensor, kxy: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
        """Q (B, 2p, d'): real then imaginary parts of the images' transforms c(k_p) Σ_j (Φ)_j exp(−2πi (Aᵀ k_p)·r_j)
        for rotations A (B, 3, 3), half-plane frequencies ``kxy`` (p, 2) in cycles/pixel and CTFs (B, p)."""
        q = torch.einsum("pi,bij->bpj", kxy.to(A.dtype), A[:, :2, :])          # (B, p, 3) cycles/voxel
        phase = (2 * math.pi) * (q @ self.xyz.T)                                 # (B, p, d)
        ctf = ctf[..., None]
        return torch.cat([(torch.cos(phase) * ctf) @ self.phi, -(torch.sin(phase) * ctf) @ self.phi], 1)

    def to_maps(self, C: torch.Tensor, box: int, apix_n: float, resolution_A: float) -> np.ndarray:
        """Coefficients (K, d') -> maps (K, box, box, box) at the particles' box, band-limited to
        ``resolution_A`` (voxel values kept, as ``ppca.fourier_pad_3d``)."""
        grid = torch.zeros((len(C), self.n ** 3), dtype=torch.float32)
        grid[:, self.flat.cpu()] = C.detach().cpu().float() @ self.phi.cpu().T
        grid = band_limit(grid.reshape(-1, self.n, self.n, self.n).numpy(), apix_n, resolution_A)
        return np.stack([fourier_pad_3d(torch.from_numpy(g), box).numpy() for g in grid])


def corner_noise_variance(particles: Any, n_work: int, seed: int) -> float:
    """White noise variance of the working-box transforms (Fourier-cropped, ``geometry.lattice`` scale) from the
    pixels outside the circle of radius box / 2 of a sample of images (ASPIRE's WhiteNoiseEstimator's pixels)."""
    N = int(particles.box)
    rows = sample_rows(len(particles.euler_deg), NOISE_SAMPLE, seed, 0xC0)
    c = np.arange(N) - N // 2
    corner = (c[:, None] ** 2 + c[None, :] ** 2) > (N / 2) ** 2
    reader = particles.reader()
    total, total2, count = 0.0, 0.0, 0
    for s in range(0, len(rows), 256):
        px = reader.read(rows[s:s + 256])[:, corner].astype(np.float64)
        total, total2, count = total + px.sum(), total2 + (px ** 2).sum(), count + px.size
    var = total2 / count - (total / count) ** 2
    if not var > 0:
        raise InputError(particles.source, "the images' corners (outside the circle of radius box / 2) have no "
                                           "noise: the method of moments needs noisy images to estimate its variance")
    # unnormalised centred DFT of N² pixels: E|F|² = N² var; cropping scales transforms by (n / N)³
    return float(var * N ** 2 * (n_work / N) ** 6)


def moments_bytes(d: int, p: int, batch_size: int) -> int:
    """Bytes of the covariance of ``d`` basis functions (float64 d² matrices) and of a batch of ``batch_size``
    images' ``p`` half-plane frequencies projected from the basis."""
    return 8 * 8 * d * d + 4 * 6 * batch_size * 2 * p * d


def plan(n_particles: int, box: int, apix: float, resolution_A: float, diameter_A: float, n_components: int,
         batch_size: int, device: torch.device, source: Any) -> tuple[Lattice, float, float, int]:
    """Working lattice, resolution radius (px), ball radius (px) and the ball's voxel count; InputError naming the
    particles when the data are too few or the basis or its memory do not fit (``resolution_A`` 0: Nyquist)."""
    if n_particles < MIN_PARTICLES:
        raise InputError(source, f"only {n_particles} particles: the method of moments needs at least "
                                 f"{MIN_PARTICLES}")
    resolution_A = resolution_A if resolution_A > 0 else 2 * apix          # 0: Nyquist
    if resolution_A < 2 * apix * (1 - 1e-6):
        raise ValueError(f"--resolution_A {resolution_A} Å is beyond Nyquist ({2 * apix:.3f} Å at {apix:.3f} Å/px)")
    lattice = Lattice(box, apix).cropped(box_for_resolution(box, apix, resolution_A))
    n = lattice.box
    radius_px = min(n // 2 - 1, n * lattice.apix / resolution_A)
    ball_px = min(n / 2, (diameter_A if diameter_A > 0 else 0.9 * box * apix) / 2 / lattice.apix)
    d = int(ball_mask(n, ball_px, torch.device("cpu"))[0].sum())
    if d > MAX_BASIS:
        raise InputError(source, f"the basis would be made from {d} voxels (those of the {n}³ working box of a "
                                 f"{resolution_A:g} Å limit within {ball_px * lattice.apix:.1f} Å of the centre); "
                                 f"at most {MAX_BASIS} are supported (the covariance has d² entries): use a larger "
                                 "--resolution_A or a smaller --diameter_A")
    p = len(lattice.half_plane(radius_px, dc=True, strict=False))
    need = moments_bytes(d, p, batch_size)

    def fits(usable: float) -> str:
        batch = int((usable - moments_bytes(d, p, 0)) // (moments_bytes(d, p, 1) - moments_bytes(d, p, 0)))
        if batch >= 1:
            return f"--batch_size {batch}"
        # largest basis x at this batch size: 64 x² + 48 batch p x <= usable
        lin = moments_bytes(1, p, batch_size) - moments_bytes(1, p, 0)
        return f"a basis of about {int((math.sqrt(lin ** 2 + 256 * max(usable, 0)) - lin) / 128)} functions"

    refuse_unless_fits(need, device, MEMORY_FRACTION, source,
                       f"the covariance of {d} basis functions with batches of {batch_size}", fits,
                       "use a larger --resolution_A, a smaller --diameter_A or a smaller --batch_size")
    return lattice, radius_px, ball_px, d


def fit_moments(particles: Any, n_components: int, *, resolution_A: float = 20.0, diameter_A: float = 0.0,
                max_iter: int = 30, tol: float = 1e-3, regularisation: float = 1e-3, batch_size: int = 256,
                device: torch.device | str = "cpu", seed: int = 0, cache_mb: float = 1024.0,
                progress: ProgressFn | None = None, log: logging.Logger | None = None,
                checkpoint: str | Path | None = None, resume: bool = False, shrinkage: str = "frobenius"
                ) -> MomentsResult:
    """Mean (least squares in the basis), covariance (CG on the normal equations), ``n_components`` principal
    volumes, their variances and the particles' Wiener coordinates.

    ``resolution_A``: band limit of the basis and of the images used; ``diameter_A``: the ball holding the basis
    voxels (0: 0.9 of the box); ``regularisation``: λ of the covariance (and λ_μ of the mean) as a fraction of
    the mean squared (resp. mean) diagonal of M̄; ``max_iter``/``tol``: CG stops when the residual of the normal
    equations relative to their right-hand side is below ``tol``, else after ``max_iter`` steps.

    ``shrinkage``: shrink the eigenvalues of the whitened second moment before CG (``shrink_rhs``; "none",
    "operator" or "frobenius" norm loss).

    ``checkpoint``: the CG state is written there after every step (``moments_state``; the one before kept as
    ``<stem>.prev<suffix>``); with ``resume`` CG continues from the newest usable of the two (``max_iter`` the
    new total), InputError naming it when it was written with other settings.
    """
    log = log or logging.getLogger("cryohet.moments")
    progress = progress or (lambda items, desc, total: items)
    device = torch.device(device)
    N_box, apix = int(particles.box), float(particles.apix)
    n_part = len(particles.euler_deg)
    source = getattr(particles, "source", None)
    lattice, radius_px, ball_px, d = plan(n_part, N_box, apix, resolution_A, diameter_A, n_components, batch_size,
                                          device, source)
    n, apix_n = lattice.box, lattice.apix
    res_used = n * apix_n / radius_px
    t0 = time.time()
    basis = BallBasis(n, ball_px, radius_px, device)
    d = len(basis)
    if n_components > d:
        raise ValueError(f"--n_components {n_components} is more than the {d} band-limited functions of the basis: "
                         "use fewer, a finer --resolution_A or a larger --diameter_A")
    src = ImageSource(particles, lattice, radius_px, batch_size, device, cache_mb)
    sigma2 = corner_noise_variance(particles, n, seed)
    sw = torch.sqrt(src.weight / sigma2)                                         # (p,) whitening
    sw2 = torch.cat([sw, sw])
    kxy = src.points.kxy.to(device)
    log.info("moments: %d particles, box %d -> working box %d (%.2f Å/px), limit %.2f Å, %d voxels in a ball of "
             "%.1f Å -> %d band-limited functions, noise σ² %.4g (corners)", n_part, N_box, n, apix_n, res_used,
             basis.voxels, 2 * ball_px * apix_n, d, sigma2)

    def whitened(batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        Q = basis.forward(batch.rotations.to(device), kxy, batch.ctf.to(device)) * sw2[:, None]
        y = batch.images_ft.to(device)
        return Q, torch.cat([y.real, y.imag], 1) * sw2

    def passes(desc: str) -> Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        for batch in progress(src.batches(), desc, src.n_batches()):
            Q, y = whitened(batch)
            yield Q, y, batch.rows

    ckpt = Path(checkpoint) if checkpoint is not None else None
    settings = {"n_particles": n_part, "poses": _poses_digest(particles), "box": N_box, "apix": apix,
                "work_box": n, "basis": d, "resolution_A": res_used, "ball_px": ball_px,
                "regularisation": regularisation, "noise_var": sigma2, "shrinkage": shrinkage}
    found = load_checkpoint(ckpt, read_cg_state, settings, log) if resume and ckpt is not None else None
    if resume and ckpt is not None and found is None:
        log.info("--resume: no checkpoint at %s, starting from scratch", ckpt)
    if found is None:
        state = _first_passes(passes, basis, n_part, regularisation, device, shrinkage)
    else:
        state = found[1]
        basis.phi, basis.norms = state.phi.to(device), state.norms.to(device)   # the basis of its coefficients
        log.info("moments: resuming from %s after CG step %d", found[0], state.iteration)
    mu, Mbar = state.mean.to(device), state.Mbar.to(device)
    mu32 = mu.float()
    scale = float(torch.diagonal(Mbar).mean())
    lam = regularisation * scale ** 2
    evals, evecs = torch.linalg.eigh(Mbar)
    denom = evals.clamp_min(0)[:, None] * evals.clamp_min(0)[None, :] + lam

    def precondition(X: torch.Tensor) -> torch.Tensor:
        return evecs @ ((evecs.T @ X @ evecs) / denom) @ evecs.T

    def operator(S: torch.Tensor, it: int) -> torch.Tensor:
        out = torch.zeros((d, d), dtype=torch.float64, device=device)
        S32 = S.float()
        for Q, _, _ in passes(f"moments: CG {it}/{max_iter}"):
            QS = Q @ S32                                                          # (B, r, d)
            U = (QS @ Q.transpose(1, 2)) @ Q                                      # (B, r, d): (Q S Qᵀ) Q
            out += (Q.reshape(-1, d).T @ U.reshape(-1, d)).double()
        return out / n_part + lam * S

    # preconditioned conjugate gradient on symmetric matrices (Frobenius inner product)
    if found is None:  # S = 0, R = the right-hand side (held in state.R), P = precondition(R)
        state.P = precondition(state.R)
        state.rz = float((state.R * state.P).sum())
    S, R, P = (getattr(state, k).to(device) for k in ("S", "R", "P"))
    rz, norm_rhs, history = state.rz, state.norm_rhs, state.history
    rel = history[-1]["relative_residual"] if history else float(R.norm()) / norm_rhs  # 0: nothing to fit
    if rel == 0:
        log.warning("moments: no eigenvalue of the whitened second moment is above the noise's bulk (--shrinkage "
                    "%s): the covariance estimate is 0", shrinkage)
    for it in range(state.iteration + 1, max_iter + 1):
        if rel < tol:
            break
        ti = time.time()
        AP = operator(P, it)
        alpha = rz / float((P * AP).sum())
        S += alpha * P
        R -= alpha * AP
        rel = float(R.norm()) / norm_rhs
        Z = precondition(R)
        rz_new = float((R * Z).sum())
        P = Z + (rz_new / rz) * P
        rz = rz_new
        history.append({"iteration": it, "relative_residual": rel, "seconds": time.time() - ti})
        log.info("moments CG %d: relative residual %.2e, %.1f s", it, rel, time.time() - ti)
        if ckpt is not None:
            save_cg_state(ckpt, CGState(mu, Mbar, S, R, P, rz, norm_rhs, it, history, basis.phi, basis.norms),
                          settings)
    S = 0.5 * (S + S.T)
    converged = rel < tol

    # principal volumes: the top eigenvectors of the maps' covariance T Σ Tᵀ (T: coefficients -> maps at the
    # particles' box, TᵀT = (N / n)³ diag(norms)), i.e. of H = (N / n)³ D^½ Σ D^½
    K = n_components
    vox = (N_box / n) ** 3
    Dh = torch.sqrt(basis.norms)
    spec, E = torch.linalg.eigh(vox * Dh[:, None] * S * Dh[None, :])
    spec, E = spec.flip(0), E.flip(1)
    coef = (E[:, :K] / Dh[:, None] / math.sqrt(vox)).cpu().numpy()                # (d', K): unit-norm maps
    comps = basis.to_maps(torch.as_tensor(coef.T), N_box, apix_n, res_used).reshape(K, -1).astype(np.float64)
    mean_map = basis.to_maps(mu[None], N_box, apix_n, res_used)[0]
    signs = np.sign(comps @ mean_map.reshape(-1).astype(np.float64))
    signs[signs == 0] = 1
    comps, coef = comps * signs[:, None], coef * signs[None, :]
    eig = spec[:K].clamp_min(0).cpu().numpy()

    # Wiener coordinates: b_m = (Λ⁻¹ + G_mᵀ G_m)⁻¹ G_mᵀ (y_m − Q_m μ), G_m = Q_m U_K
    Uk = torch.as_tensor(coef, dtype=torch.float32, device=device)
    prior = torch.diag(torch.as_tensor(1.0 / np.maximum(eig, 1e-30), dtype=torch.float64, device=device))
    latents = np.zeros((n_part, K))
    latent_std = np.zeros((n_part, K))
    for Q, y, rows in passes("moments: coordinates"):
        Gm = Q @ Uk                                                              # (B, r, K)
        cov = torch.linalg.inv(prior + (Gm.transpose(1, 2) @ Gm).double())
        h = torch.einsum("brk,br->bk", Gm, y - Q @ mu32).double()
        latents[rows] = torch.einsum("bkl,bl->bk", cov, h).cpu().numpy()
        latent_std[rows] = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0)).cpu().numpy()
    log.info("moments: eigenvalues %s (CG %s after %d steps, relative residual %.2e), %.1f s",
             np.array2string(eig, precision=4), "converged" if converged else "stopped", len(history), rel,
             time.time() - t0)
    return MomentsResult(
        mean_basis=mean_map.astype(np.float32), components=comps.reshape((K,) + (N_box,) * 3).astype(np.float32),
        eigenvalues=eig, spectrum=spec.cpu().numpy(), latents=latents, latent_std=latent_std, noise_var=sigma2,
        work_box=n, basis_size=d, resolution_A=float(res_used), history=history, converged=converged,
        last_change=rel, tol=tol, iterations=len(history))


def _poses_digest(particles: Any) -> str:
    """Short fingerprint of the particles' poses (other poses must not be resumed)."""
    return array_digest(particles.euler_deg, particles.shift_A)


def array_digest(*arrays: Any) -> str:
    """Short fingerprint of arrays' values (as float64), for a checkpoint's settings."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _first_passes(passes: Callable[[str], Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]]],
                  basis: BallBasis, n_part: int, regularisation: float, device: torch.device,
                  shrinkage: str = "none") -> CGState:
    """The two passes before CG: Σ M_m and Σ Q_mᵀ y_m (the least-squares mean in the basis and M̄), then the
    right-hand side of the covariance equations (its spectrum shrunk by ``shrinkage``); CG's state at step 0
    (S = 0, R = the right-hand side; P and ⟨R, Z⟩ left for the preconditioner)."""
    d = len(basis)
    Msum = torch.zeros((d, d), dtype=torch.float64, device=device)
    rhs_mu = torch.zeros(d, dtype=torch.float64, device=device)
    for Q, y, _ in passes("moments: mean"):
        Qf = Q.reshape(-1, d)
        Msum += (Qf.T @ Qf).double()
        rhs_mu += torch.einsum("brd,br->d", Q, y).double()
    Mbar = Msum / n_part
    scale = float(torch.diagonal(Mbar).mean())
    mu = torch.linalg.solve(Msum + regularisation * scale * n_part * torch.eye(d, dtype=torch.float64,
                                                                                   device=device), rhs_mu)
    mu32 = mu.float()
    rhs = torch.zeros((d, d), dtype=torch.float64, device=device)
    for Q, y, _ in passes("moments: second moments"):
        b = torch.einsum("brd,br->bd", Q, y - Q @ mu32)
        Qf = Q.reshape(-1, d)
        rhs += (b.T @ b - Qf.T @ Qf).double()
    rhs /= n_part
    if shrinkage != "none":
        rhs = shrink_rhs(rhs, Mbar, d / n_part, shrinkage)
    return CGState(mu, Mbar, torch.zeros_like(rhs), rhs, rhs, 0.0, float(rhs.norm()) or 1.0, 0, [], basis.phi,
                   basis.norms)


def spike_shrinker(lam: torch.Tensor, gamma: float, loss: str) -> torch.Tensor:
    """Signal eigenvalues from eigenvalues ``lam`` of a sample covariance whose noise is white with variance 1
    (spiked model, aspect ratio ``gamma`` = dimension / samples; Donoho, Gavish & Johnstone 2018): 0 inside the
    Marchenko-Pastur bulk (λ ≤ (1 + √γ)²); above it the spike ℓ(λ) less the noise, ℓ − 1, for the operator norm
    loss, times the squared cosine c² = (1 − γ/(ℓ−1)²) / (1 + γ/(ℓ−1)) for the Frobenius loss (ASPIRE's
    ``shrink_covar``)."""
    if loss not in SHRINKERS[1:]:
        raise ValueError(f"unknown shrinkage {loss!r}; known: {', '.join(SHRINKERS)}")
    above = lam > (1 + math.sqrt(gamma)) ** 2
    lam_a = torch.where(above, lam, torch.full_like(lam, 4.0 * (1 + gamma)))  # placeholder inside the bulk
    t = lam_a + 1 - gamma
    signal = (t + torch.sqrt((t * t - 4 * lam_a).clamp_min(0))) / 2 - 1
    if loss == "frobenius":
        signal = signal * ((1 - gamma / signal ** 2) / (1 + gamma / signal)).clamp_min(0)
    return torch.where(above, signal, torch.zeros_like(lam))


def shrink_rhs(rhs: torch.Tensor, Mbar: torch.Tensor, gamma: float, loss: str) -> torch.Tensor:
    """Andén & Singer's (2018) eigenvalue shrinkage of the covariance's right-hand side (1/N) Σ (b_m b_mᵀ − M_m):
    whitened by M̄^(-1/2), the second moment B = M̄^(-1/2) rhs M̄^(-1/2) + I of the back-projected images has
    white noise of variance 1 (M_m ≈ M̄), so its eigenvalues are shrunk by ``spike_shrinker`` (``gamma``: basis
    size / particles) and the result coloured back: M̄^(1/2) V η(Λ) Vᵀ M̄^(1/2)."""
    ev, U = torch.linalg.eigh(Mbar)
    ev = ev.clamp_min(float(ev.max()) * 1e-12)
    half, inv_half = (U * ev.sqrt()) @ U.T, (U / ev.sqrt()) @ U.T
    B = inv_half @ rhs @ inv_half
    lam, V = torch.linalg.eigh(0.5 * (B + B.T) + torch.eye(len(B), dtype=B.dtype, device=B.device))
    return half @ ((V * spike_shrinker(lam, gamma, loss)) @ V.T) @ half
