"""Method of moments with unknown (uniform) poses (survey section 8; Kam 1980, Sharon et al. 2020): a map, and a
low-rank heterogeneous model, fitted to the images' rotation-invariant first, second and third moments
(``invariant_moments``).

Model: a volume with coefficients c in the band-limited ball basis of the known-pose estimator
(``moments.BallBasis``: exact transforms of its projections at the working lattice's pixels), projected along
the directions of a quadrature on the sphere (``pose_grid.sphere_grid``, equal weights); the invariants do not
depend on the in-plane angle, so directions suffice: against 6000 random rotations the relative difference of the
three moments is the same, ~5e-7, with the 104 directions of a 20° step as with all 14868 rotations of the 10°
SO(3) grid (working box 16, 20 Å). The invariants of each projection's features are averaged over the quadrature.
For the low-rank model V = μ + Σ_k z_k W_k, z ~ N(0, I) (the scale of each W_k carries its variance), with u the
features of μ and w_k those of W_k at one rotation, E over z gives

    E[a_i] = u_i,   E[a_i ā_j] = u_i ū_j + Σ_k w_ki w̄_kj,   E[a_i a_j a_l] = u_i u_j u_l + Σ_k (u_i w_kj w_kl +
    w_ki u_j w_kl + w_ki w_kj u_l).

Fit: relative least squares on the three moments (each defocus group's CTF in its model; every invariant divided
by the data's amplitude on its rings) by L-BFGS from several random starts, with frequency marching (rings <= 2
first, one more ring per stage). The result is defined up to a rotation and the hand (mirror): no orientation is
chosen.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryohet.device import refuse_unless_fits
from cryohet.inference.invariant_moments import InvariantMoments, SteerableFeatures
from cryohet.inference.moments import MEMORY_FRACTION, BallBasis

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ProjectionModel:
    """Invariant moments of the projections of a volume (or low-rank model) in ``basis`` over ``rotations``
    (Q, 3, 3), per defocus group: the features ``feats`` of the projections' transforms at the half-plane pixels
    ``kxy`` (p, 2) (cycles/px) times each group's mean |c| ``ctf`` (G, p). Holds G (G, Q, D, d') complex64:
    coefficients -> features at every rotation."""

    def __init__(self, basis: BallBasis, feats: SteerableFeatures, kxy: torch.Tensor, rotations: torch.Tensor,
                 ctf: torch.Tensor, source: object = None, chunk: int = 128):
        dev = feats.F.device
        Q, D, d = len(rotations), len(feats), len(basis)
        refuse_unless_fits(8.0 * len(ctf) * Q * D * d, dev, MEMORY_FRACTION, source or "particles",
                           f"the projections of {d} basis functions at {Q} directions for {len(ctf)} defocus groups",
                           lambda u: "", "use a larger --resolution_A, --quadrature_deg or fewer --defocus_groups")
        c2 = torch.cat([ctf, ctf], 1).to(dev)
        F = (feats.F[None] * c2[:, None, :]).to(torch.complex64)                   # (G, D, 2p)
        kxy = kxy.to(dev)
        ones = torch.ones((1, len(kxy)), device=dev)
        parts = []
        for s in range(0, Q, chunk):
            A = rotations[s:s + chunk].to(dev)
            proj = basis.forward(A, kxy, ones.expand(len(A), -1))                 # (B, 2p, d') float32
            parts.append(torch.einsum("gdr,brk->gbdk", F, proj.to(torch.complex64)))
        self.G = torch.cat(parts, 1)
        self.feats = feats

    def features(self, coef: torch.Tensor) -> torch.Tensor:
        """(..., d') float -> (..., G, Q, D) complex128 features of the projections."""
        return torch.einsum("gqdk,...k->...gqd", self.G, coef.to(torch.complex64)).to(torch.complex128)

    def moments(self, mean: torch.Tensor, comps: torch.Tensor | None = None) -> Moments:
        """Invariant moments (G, T) of the volume ``mean`` (d',) or of the low-rank model with components
        ``comps`` (K, d'), averaged over the quadrature."""
        f = self.feats
        u = self.features(mean)
        i, j = f.i2
        m1, m2, m3 = (x.mean(-2) for x in f.invariants(u))
        if comps is None or len(comps) == 0:
            return m1, m2, m3
        w = self.features(comps)                                                 # (K, G, Q, D)
        m2 = m2 + (w[..., i] * w[..., j].conj()).mean(-2).sum(0)
        a, b, c = f.i3
        third = (u[..., a] * w[..., b] * w[..., c] + w[..., a] * u[..., b] * w[..., c]
                 + w[..., a] * w[..., b] * u[..., c])
        return m1, m2, m3 + third.mean(-2).sum(0)


@dataclass
class FitResult:
    """Coefficients of the fitted mean (d',) and components (K, d'), the relative residual of each moment."""

    mean: torch.Tensor
    comps: torch.Tensor
    residuals: tuple[float, float, float]
    loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def ring_weights(feats: SteerableFeatures, data: InvariantMoments, floor: float = 1e-3
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per invariant 1 / Π s_ring over its features, s_r² the data's mean power on ring r (all groups; at least
    ``floor`` of the largest), so that every ring counts in the fit and not only the strong low frequencies."""
    diag = feats.i2[0] == feats.i2[1]
    ring = feats.ring[feats.i2[0][diag]]
    power = torch.zeros(feats.n_rings, dtype=torch.float64, device=ring.device)
    power.index_add_(0, ring, (data.counts[:, None] * data.m2[:, diag].real).sum(0) / data.counts.sum())
    power = power / torch.bincount(ring, minlength=feats.n_rings).clamp_min(1)
    s = torch.sqrt(power.clamp_min(floor * float(power.max())))[feats.ring]
    return 1 / s[feats.i1], 1 / (s[feats.i2[0]] * s[feats.i2[1]]), 1 / s[feats.i3].prod(0)


def relative_residuals(model_m: Moments, data: InvariantMoments, masks: tuple[torch.Tensor, ...] | None = None,
                       weights: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
    """Σ_g n_g ||v ⊙ (model_g − data_g)||² / Σ_g n_g ||v ⊙ data_g||² for each moment, over the invariants in
    ``masks`` (v: ``weights``, e.g. :func:`ring_weights`, default 1; n_g the groups' sizes)."""
    out = []
    n = data.counts[:, None]
    for t, (mm, md) in enumerate(zip(model_m, data.parts(), strict=True)):
        keep = masks[t] if masks is not None else slice(None)
        v = weights[t][keep] if weights is not None else 1.0
        diff = v * (mm - md)[:, keep]
        out.append((n * diff.abs() ** 2).sum() / (n * (v * md[:, keep]).abs() ** 2).sum().clamp_min(1e-300))
    return out


def _lbfgs(params: list[torch.Tensor], closure: Callable[[], torch.Tensor], iters: int) -> float:
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = closure()
        loss.backward()
        return loss

    opt.step(step)
    with torch.no_grad():
        return float(closure())


def _stages(feats: SteerableFeatures, first_ring: int = 2) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
    """Frequency marching: (largest ring, masks of the invariants it uses) per stage."""
    rings = feats.max_ring()
    top = feats.n_rings - 1
    return [(r, tuple(x <= r for x in rings)) for r in range(min(first_ring, top), top + 1)]


def fit_volume(model: ProjectionModel, data: InvariantMoments, n_starts: int = 6, iters: int = 60, seed: int = 0,
               log: logging.Logger | None = None) -> FitResult:
    """The map's coefficients: relative least squares on the three moments, ``n_starts`` random starts at the
    first stage of frequency marching (the best continues), ``iters`` L-BFGS steps per stage."""
    log = log or logging.getLogger("cryohet.moments")
    d = model.G.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    stages = _stages(model.feats)
    history: list[dict[str, float]] = []
    weights = ring_weights(model.feats, data)

    def objective(c: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum(relative_residuals(model.moments(c), data, masks, weights))

    best: tuple[float, torch.Tensor] | None = None
    r0, masks0 = stages[0]
    for s in range(n_starts):
        c = torch.randn(d, generator=gen, dtype=torch.float64).to(model.G.device)
        with torch.no_grad():   # scale the start so that its second moment has the data's norm
            m2 = model.moments(c)[1]
            c *= math.sqrt(float(data.m2.abs().norm() / m2.abs().norm().clamp_min(1e-300)))
        c.requires_grad_(True)
        loss = _lbfgs([c], lambda c=c: objective(c, masks0), iters)
        history.append({"stage_ring": r0, "start": s, "loss": loss})
        log.info("moments (uniform poses): start %d, rings <= %d: loss %.4g", s, r0, loss)
        if best is None or loss < best[0]:
            best = (loss, c.detach().clone())
    assert best is not None
    c = best[1].requires_grad_(True)
    for r, masks in stages[1:]:
        loss = _lbfgs([c], lambda masks=masks: objective(c, masks), iters)
        history.append({"stage_ring": r, "start": -1, "loss": loss})
        log.info("moments (uniform poses): rings <= %d: loss %.4g", r, loss)
    with torch.no_grad():
        res = [float(x) for x in relative_residuals(model.moments(c), data)]
    return FitResult(c.detach(), torch.zeros((0, d), dtype=torch.float64), tuple(res), sum(res), history)


def fit_low_rank(model: ProjectionModel, data: InvariantMoments, mean: torch.Tensor, n_components: int,
                 n_starts: int = 4, iters: int = 100, seed: int = 0, scale: float = 0.3,
                 log: logging.Logger | None = None) -> FitResult:
    """μ and W (K, d') of V = μ + Σ z_k W_k, z ~ N(0, I), from the start μ = ``mean`` (the homogeneous fit) and
    ``n_starts`` random W of norm ``scale`` × |μ|, all rings at once; the best fit is kept."""
    log = log or logging.getLogger("cryohet.moments")
    d = len(mean)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = ring_weights(model.feats, data)
    best: FitResult | None = None
    for s in range(n_starts):
        mu = mean.clone().requires_grad_(True)
        W = torch.randn((n_components, d), generator=gen, dtype=torch.float64).to(mean.device)
        W = (W * (scale * float(mean.norm()) / W.norm(dim=1, keepdim=True))).requires_grad_(True)
        loss = _lbfgs([mu, W], lambda mu=mu, W=W: sum(relative_residuals(model.moments(mu, W), data, None, weights)),
                      iters)
        log.info("moments (uniform poses): low-rank start %d: loss %.4g", s, loss)
        if best is None or loss < best.loss:
            with torch.no_grad():
                res = [float(x) for x in relative_residuals(model.moments(mu, W), data)]
            best = FitResult(mu.detach(), W.detach(), tuple(res), loss, [{"start": s, "loss": loss}])
    assert best is not None
    return best


def principal_directions(comps: torch.Tensor, basis: BallBasis) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal principal directions (K, d') of the maps' covariance Σ_k W_k W_kᵀ (in map norm, working box)
    and their variances, largest first."""
    Dh = torch.sqrt(basis.norms.to(comps.dtype).to(comps.device))
    scaled = comps * Dh                                                          # coefficients -> map norm
    U, S, Vt = torch.linalg.svd(scaled, full_matrices=False)
    return (Vt / Dh).cpu().numpy(), (S ** 2).cpu().numpy()


@dataclass
class UniformResult:
    """Result of :func:`fit_uniform_poses`: maps at the particles' box (orientation and hand arbitrary)."""

    volume: np.ndarray               # (box,)*3 float32, the homogeneous fit
    residuals: tuple[float, float, float]
    low_rank_mean: np.ndarray | None  # (box,)*3, μ of the low-rank fit (None without one)
    components: np.ndarray            # (K, box, box, box) unit-norm principal volumes
    variances: np.ndarray             # (K,) their variances (map units² · voxels)
    low_rank_residuals: tuple[float, float, float] | None
    data: InvariantMoments
    noise_var: float
    work_box: int
    basis_size: int
    n_features: int
    n_rotations: int
    resolution_A: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit_uniform_poses(particles: Any, *, resolution_A: float = 20.0, diameter_A: float = 0.0,
                      n_components: int = 0, quadrature_deg: float = 20.0, n_starts: int = 4, iters: int = 50,
                      defocus_groups: int = 4, batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
                      log: logging.Logger | None = None) -> UniformResult:
    """Invariant moments of ``particles`` (one streaming pass), then the map fitted to them and, for
    ``n_components`` > 0, the low-rank model; rotations uniform, their values in the particle file ignored
    (the origins are undone where given, NaN ones taken as 0). ``quadrature_deg``: step of the quadrature's
    projection directions."""
    from dataclasses import replace

    from cryohet.inference import invariant_moments
    from cryohet.inference.moments import corner_noise_variance, plan
    from cryohet.inference.pose_grid import sphere_grid
    from cryohet.inference.ppca import ImageSource

    log = log or logging.getLogger("cryohet.moments")
    device = torch.device(device)
    particles = replace(particles, euler_deg=np.zeros_like(particles.euler_deg),
                        shift_A=np.nan_to_num(np.asarray(particles.shift_A, dtype=np.float64)))
    N_box, apix = int(particles.box), float(particles.apix)
    source = getattr(particles, "source", None)
    lattice, radius_px, ball_px, _ = plan(len(particles.euler_deg), N_box, apix, resolution_A, diameter_A, 1,
                                          batch_size, device, source)
    n, apix_n = lattice.box, lattice.apix
    res_used = n * apix_n / radius_px
    basis = BallBasis(n, ball_px, radius_px, device)
    src = ImageSource(particles, lattice, radius_px, batch_size, device, 0.0)
    feats = SteerableFeatures(src.points, n, ball_px, device=device)
    sigma2 = corner_noise_variance(particles, n, seed)
    ctf = particles.ctf
    group = torch.as_tensor(invariant_moments.defocus_groups(0.5 * (np.asarray(ctf.defocus_u_A)
                                                                      + np.asarray(ctf.defocus_v_A)),
                                                               defocus_groups))
    data = invariant_moments.accumulate(((b.images_ft, b.ctf, group[b.rows]) for b in src.batches()), feats,
                                        sigma2, defocus_groups)
    rotations = sphere_grid(quadrature_deg)
    model = ProjectionModel(basis, feats, src.points.kxy, rotations, data.ctf, source)
    log.info("moments (uniform poses): %d particles, working box %d (%.2f Å/px), limit %.2f Å, %d band-limited "
             "functions, %d steerable features (%d rings), invariants %s, %d quadrature directions, %d defocus groups, "
             "noise σ² %.4g", data.n, n, apix_n, res_used, len(basis), len(feats), feats.n_rings, feats.sizes(),
             len(rotations), len(data.counts), sigma2)
    hom = fit_volume(model, data, n_starts, iters, seed, log)

    def maps(coef: torch.Tensor) -> np.ndarray:
        return basis.to_maps(coef.reshape(-1, len(basis)), N_box, apix_n, res_used)

    volume = maps(hom.mean)[0]
    lr_mean, comps, variances, lr_res = None, np.zeros((0,) + volume.shape, np.float32), np.zeros(0), None
    history = list(hom.history)
    if n_components > 0:
        lr = fit_low_rank(model, data, hom.mean, n_components, n_starts, 2 * iters, seed, log=log)
        lr_mean, lr_res = maps(lr.mean)[0], lr.residuals
        coef, var = principal_directions(lr.comps, basis)
        comps = maps(torch.as_tensor(coef))
        norms = np.linalg.norm(comps.reshape(len(comps), -1), axis=1)
        comps = (comps / norms.reshape(-1, 1, 1, 1)).astype(np.float32)
        variances = var * (N_box / n) ** 3
        history += lr.history
    log.info("moments (uniform poses): relative residuals of the 1st, 2nd, 3rd moments %s; the map's orientation "
             "and hand are arbitrary (not aligned to anything)", np.array2string(np.array(hom.residuals),
                                                                              precision=3))
    return UniformResult(volume.astype(np.float32), hom.residuals, lr_mean, comps, variances, lr_res, data, sigma2,
                         n, len(basis), len(feats), len(rotations), float(res_used), history)
