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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cryohet.device import refuse_unless_fits
from cryohet.inference.invariant_moments import InvariantMoments, SteerableFeatures
from cryohet.inference.moments import MEMORY_FRACTION, BallBasis, array_digest
from cryohet.inference.moments_uniform_state import FitProgress, UniformState, read_uniform_state, save_uniform_state

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
T = TypeVar("T")
#: ``RunContext.progress``: (items, description, total) -> the items (with abort checks)
Progress = Callable[[Iterable[T], str, int], Iterable[T]]


def _no_progress(items: Iterable[T], desc: str, total: int) -> Iterable[T]:
    return items


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
               log: logging.Logger | None = None, done: FitProgress | None = None,
               save: Callable[[], None] | None = None, progress: Progress = _no_progress) -> FitResult:
    """The map's coefficients: relative least squares on the three moments, ``n_starts`` random starts at the
    first stage of frequency marching (the best continues), ``iters`` L-BFGS steps per stage.

    ``done``: the fit's progress, updated after every start and stage (then ``save`` is called, for a checkpoint);
    a fit given the progress of an interrupted one goes on from there and ends as if it had not stopped."""
    log = log or logging.getLogger("cryohet.moments")
    d = model.G.shape[-1]
    dev = model.G.device
    gen = torch.Generator().manual_seed(seed)
    stages = _stages(model.feats)
    p = done if done is not None else FitProgress()
    weights = ring_weights(model.feats, data)

    def objective(c: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum(relative_residuals(model.moments(c), data, masks, weights))

    r0, masks0 = stages[0]
    for s in progress(range(n_starts), "moments (uniform poses): map's random starts", n_starts):
        c = torch.randn(d, generator=gen, dtype=torch.float64).to(dev)
        if s < p.starts:
            continue   # finished before the run stopped: its draw only, so that the generator goes on as then
        with torch.no_grad():   # scale the start so that its second moment has the data's norm
            m2 = model.moments(c)[1]
            c *= math.sqrt(float(data.m2.abs().norm() / m2.abs().norm().clamp_min(1e-300)))
        c.requires_grad_(True)
        loss = _lbfgs([c], lambda c=c: objective(c, masks0), iters)
        p.history.append({"stage_ring": r0, "start": s, "loss": loss})
        log.info("moments (uniform poses): start %d, rings <= %d: loss %.4g", s, r0, loss)
        if not p.best or loss < p.loss:
            p.loss, p.best = loss, {"mean": c.detach().clone()}
        p.starts = s + 1
        _call(save)
    c = p.best["mean"].to(dev).clone().requires_grad_(True)
    for i, (r, masks) in enumerate(stages[1:], 1):
        if i <= p.stages:
            continue
        loss = _lbfgs([c], lambda masks=masks: objective(c, masks), iters)
        p.history.append({"stage_ring": r, "start": -1, "loss": loss})
        log.info("moments (uniform poses): rings <= %d: loss %.4g", r, loss)
        p.stages, p.best = i, {"mean": c.detach().clone()}
        _call(save)
    with torch.no_grad():
        res = [float(x) for x in relative_residuals(model.moments(c), data)]
    return FitResult(c.detach(), torch.zeros((0, d), dtype=torch.float64), tuple(res), sum(res), list(p.history))


def _call(save: Callable[[], None] | None) -> None:
    if save is not None:
        save()


def fit_low_rank(model: ProjectionModel, data: InvariantMoments, mean: torch.Tensor, n_components: int,
                 n_starts: int = 4, iters: int = 100, seed: int = 0, scale: float = 0.3,
                 log: logging.Logger | None = None, done: FitProgress | None = None,
                 save: Callable[[], None] | None = None, progress: Progress = _no_progress) -> FitResult:
    """μ and W (K, d') of V = μ + Σ z_k W_k, z ~ N(0, I), from the start μ = ``mean`` (the homogeneous fit) and
    ``n_starts`` random W of norm ``scale`` × |μ|, all rings at once; the best fit is kept. ``done``, ``save``:
    as for :func:`fit_volume` (after every start)."""
    log = log or logging.getLogger("cryohet.moments")
    d = len(mean)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = ring_weights(model.feats, data)
    p = done if done is not None else FitProgress()
    for s in progress(range(n_starts), "moments (uniform poses): low-rank random starts", n_starts):
        W = torch.randn((n_components, d), generator=gen, dtype=torch.float64).to(mean.device)
        if s < p.starts:
            continue   # finished before the run stopped (as in fit_volume)
        mu = mean.clone().requires_grad_(True)
        W = (W * (scale * float(mean.norm()) / W.norm(dim=1, keepdim=True))).requires_grad_(True)
        loss = _lbfgs([mu, W], lambda mu=mu, W=W: sum(relative_residuals(model.moments(mu, W), data, None, weights)),
                      iters)
        log.info("moments (uniform poses): low-rank start %d: loss %.4g", s, loss)
        if not p.best or loss < p.loss:
            with torch.no_grad():
                res = [float(x) for x in relative_residuals(model.moments(mu, W), data)]
            p.loss, p.best, p.residuals = loss, {"mean": mu.detach().clone(), "comps": W.detach().clone()}, res
            p.history = [{"start": s, "loss": loss}]
        p.starts = s + 1
        _call(save)
    return FitResult(p.best["mean"].to(mean.device), p.best["comps"].to(mean.device), tuple(p.residuals), p.loss,
                     list(p.history))


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
                      log: logging.Logger | None = None, progress: Progress = _no_progress,
                      checkpoint: str | Path | None = None, resume: bool = False,
                      checkpoint_s: float = 60.0) -> UniformResult:
    """Invariant moments of ``particles`` (one streaming pass), then the map fitted to them and, for
    ``n_components`` > 0, the low-rank model; rotations uniform, their values in the particle file ignored
    (the origins are undone where given, NaN ones taken as 0). ``quadrature_deg``: step of the quadrature's
    projection directions.

    ``checkpoint``: the pass's sums are written there every ``checkpoint_s`` seconds and at its end, the fits'
    progress after every random start and marching stage (``moments_uniform_state``; the one before kept as
    ``<stem>.prev<suffix>``); with ``resume`` the run goes on from the newest usable of the two and ends as an
    uninterrupted one; InputError naming it when it was written with other settings."""
    from dataclasses import replace

    from cryohet.inference import invariant_moments
    from cryohet.inference.em_state import load_checkpoint
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
    ckpt = Path(checkpoint) if checkpoint is not None else None
    settings = {"n_particles": len(particles.euler_deg), "data": array_digest(particles.shift_A, group.numpy()),
                "box": N_box, "apix": apix, "work_box": n, "resolution_A": float(res_used), "ball_px": ball_px,
                "noise_var": sigma2, "defocus_groups": defocus_groups, "batch_size": batch_size,
                "quadrature_deg": quadrature_deg, "n_starts": n_starts, "iters": iters, "n_components": n_components,
                "seed": seed}
    found = load_checkpoint(ckpt, read_uniform_state, settings, log) if resume and ckpt is not None else None
    if resume and ckpt is not None and found is None:
        log.info("--resume: no checkpoint at %s, starting from scratch", ckpt)
    acc = invariant_moments.MomentAccumulator(feats, defocus_groups)
    if found is not None:
        state = found[1]
        acc.restore(state.sums, state.ctf, state.counts)
        basis.phi, basis.norms = (state.basis[k].to(device) for k in ("phi", "norms"))   # its coefficients' basis
        log.info("moments (uniform poses): resuming from %s (%d of %d batches of the pass; starts done: map %d, "
                 "low-rank %d)", found[0], state.batches, src.n_batches(), state.fits["map"].starts,
                 state.fits["low_rank"].starts)
    else:
        state = UniformState(acc.s, acc.ctf, acc.counts, 0, {"phi": basis.phi, "norms": basis.norms})

    def save() -> None:
        if ckpt is not None:
            state.sums, state.ctf, state.counts = acc.s, acc.ctf, acc.counts
            save_uniform_state(ckpt, state, settings)

    _accumulate(acc, src, group, state, progress, save, checkpoint_s)
    data = acc.result(sigma2)
    rotations = sphere_grid(quadrature_deg)
    model = ProjectionModel(basis, feats, src.points.kxy, rotations, data.ctf, source)
    log.info("moments (uniform poses): %d particles, working box %d (%.2f Å/px), limit %.2f Å, %d band-limited "
             "functions, %d steerable features (%d rings), invariants %s, %d quadrature directions, %d defocus groups, "
             "noise σ² %.4g", data.n, n, apix_n, res_used, len(basis), len(feats), feats.n_rings, feats.sizes(),
             len(rotations), len(data.counts), sigma2)
    hom = fit_volume(model, data, n_starts, iters, seed, log, state.fits["map"], save, progress)

    def maps(coef: torch.Tensor) -> np.ndarray:
        return basis.to_maps(coef.reshape(-1, len(basis)), N_box, apix_n, res_used)

    volume = maps(hom.mean)[0]
    lr_mean, comps, variances, lr_res = None, np.zeros((0,) + volume.shape, np.float32), np.zeros(0), None
    history = list(hom.history)
    if n_components > 0:
        lr = fit_low_rank(model, data, hom.mean, n_components, n_starts, 2 * iters, seed, log=log,
                          done=state.fits["low_rank"], save=save, progress=progress)
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


def _accumulate(acc: Any, src: Any, group: torch.Tensor, state: UniformState, progress: Progress,
                save: Callable[[], None], checkpoint_s: float) -> None:
    """The pass over the batches ``state`` has not done yet into ``acc`` (``invariant_moments.MomentAccumulator``),
    counting them in ``state``; ``save`` every ``checkpoint_s`` seconds and at the end."""
    total = src.n_batches()
    if state.batches == total:
        return
    last = time.monotonic()
    for b in progress(src.batches(state.batches), "moments (uniform poses): invariant moments",
                      total - state.batches):
        acc.add(b.images_ft, b.ctf, group[b.rows])
        state.batches += 1
        if state.batches < total and time.monotonic() - last >= checkpoint_s:
            save()
            last = time.monotonic()
    save()

