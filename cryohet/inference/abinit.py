"""Ab initio reconstruction: a map and every particle's pose from images with CTF and no poses.

Expectation-maximisation over poses with frequency marching, in two phases:

- **global** (``n_global`` iterations): every image is searched over all of SO(3) × shifts against one reference
  (the mean of the two half-maps), hierarchically (:mod:`cryohet.inference.pose_grid`): a base grid of ~15°
  scored at the band limit that step can resolve (radius 2 / step pixels), then levels that halve the steps and
  widen the band limit, keeping the ``keep`` best poses of each image. The kept poses are backprojected with
  their posterior probabilities (softmax of the Gaussian log-likelihoods under the per-shell noise estimated from
  the residuals), so early iterations, whose references are poor, average over their uncertainty. The search's
  band limit grows geometrically from ``ini_high_A`` to ``global_high_A``.
- **local** (``n_local`` iterations, RELION's auto-refine): each half-set is refined against its own half-map
  (gold standard) by a shrinking local search around its poses, scored up to its half-map FSC 0.143 plus a
  margin (never beyond ``resolution_A``).

The first reference is a user's map low-passed to ``ini_high_A`` or, without one, the reconstruction of
``init_particles`` images at random orientations (a lumpy blob that breaks the symmetry a sphere would keep). The
references are masked by a soft sphere of the particle's diameter. After the last iteration the map, half-maps
and FSC are reconstructed at the full box from the final poses. The hand of an ab initio map is undetermined:
the map and its mirror image explain the images equally well.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryohet.data.loader import BatchStream, Progress
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.errors import InputError
from cryohet.geometry.backproject import BackProjector
from cryohet.geometry.fourier import fourier_resize_3d
from cryohet.geometry.lattice import Lattice, box_for_resolution, crop_scale
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.shift import undo_origin
from cryohet.inference.classify_em import MIN_INSERT_PROBABILITY
from cryohet.inference.em_state import load_checkpoint
from cryohet.inference.pose_grid import Hypotheses, grid_search, refine_hypotheses, shift_grid, so3_grid
from cryohet.inference.pose_search import PoseScorer
from cryohet.io.weights import read_weights, write_weights
from cryohet.reconstruct.fsc import resolution_at
from cryohet.reconstruct.homogeneous import wiener_reconstruct
from cryohet.simulate.density import lowpass_map

FORMAT = "cryohet-abinit-checkpoint-1"
#: width of the solvent mask's cosine edge, Å
SOLVENT_EDGE_A = 5.0
#: shells beyond the FSC 0.143 resolution that the local phase scores (room for the resolution to improve)
MARGIN_SHELLS = 3
#: a level's band limit in pixels is this over its angular step in radians (finer detail would alias the step)
RADIUS_PER_STEP = 2.0
#: the local phase's first origin step, pixels of the working lattice (its levels halve it)
LOCAL_SHIFT_PX = 2.0
#: refinement levels of a local iteration: steps 2 / limit radians (its band limit's), then half, a quarter
LOCAL_LEVELS = 3


@dataclass
class AbinitSettings:
    """What an ab initio run does; everything in Å or degrees is converted per iteration."""

    n_global: int = 15               # global-search iterations
    n_local: int = 6                 # local, gold-standard iterations
    ini_high_A: float = 30.0         # first band limit (and the low-pass of the first reference), Å
    global_high_A: float = 15.0      # band limit of the last global iteration, Å
    resolution_A: float = 0.0        # never score beyond this, Å (0: Nyquist)
    grid_step_deg: float = 15.0      # base grid step on SO(3), degrees
    keep: int = 8                    # poses kept per image and level of a global search
    keep_local: int = 4              # and of a local one
    max_shift_A: float = 0.0         # origins searched within ±this in x and y, Å (0: 10 % of the box)
    particle_diameter_A: float = 0.0  # soft spherical solvent mask, Å (0: 80 % of the box)
    init_particles: int = 100        # images at random orientations in the first reference (no --reference)
    global_subset: int = 300         # random particles per global iteration but the last (stochastic EM)
    batch_size: int = 128

    def shift_range_A(self, box: int, apix: float) -> float:
        return self.max_shift_A if self.max_shift_A > 0 else 0.1 * box * apix

    def diameter_A(self, box: int, apix: float) -> float:
        return self.particle_diameter_A if self.particle_diameter_A > 0 else 0.8 * box * apix


@dataclass
class AbinitState:
    """Everything the next iteration starts from."""

    iteration: int                   # iterations done
    refs: torch.Tensor               # (2, b, b, b) each half-set's reference (b: the last iteration's box)
    noise_var: torch.Tensor          # (box // 2 + 1,) noise variance per shell of the full-box transforms
    rotations: np.ndarray            # (N, 3, 3) float32 best rotation (RELION matrices)
    shifts_A: np.ndarray             # (N, 2) best origin, Å (RELION's rlnOriginX/YAngst)
    history: list[dict[str, Any]]


@dataclass
class AbinitFit:
    """The outcome of :func:`fit_abinit` at the full box."""

    map: torch.Tensor                # (n, n, n)
    half_maps: torch.Tensor          # (2, n, n, n) Wiener-filtered half-maps
    fsc: np.ndarray                  # FSC of the unfiltered half-maps per shell
    rotations: np.ndarray            # (N, 3, 3)
    shifts_A: np.ndarray             # (N, 2)
    max_probability: np.ndarray      # (N,) posterior weight of the best pose in the last iteration
    log_likelihood: np.ndarray       # (N,) its score
    history: list[dict[str, Any]]
    apix: float

    def resolution_A(self, threshold: float = 0.143) -> float:
        return resolution_at(self.fsc, self.map.shape[-1], self.apix, threshold)


# ------------------------------------------------------------------------------------------------ checkpoints

def save_state(path: Path, state: AbinitState, settings: dict[str, Any]) -> None:
    tensors = {"refs": state.refs.detach().to(torch.float32), "noise_var": state.noise_var.detach().cpu(),
               "rotations": torch.from_numpy(np.ascontiguousarray(state.rotations, dtype=np.float32)),
               "shifts_A": torch.from_numpy(np.ascontiguousarray(state.shifts_A, dtype=np.float64))}
    meta = {"format": FORMAT, "iteration": str(state.iteration), "history": json.dumps(state.history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta, checkpoint=True)


def read_state(path: Path) -> tuple[AbinitState, dict[str, Any]]:
    tensors, meta = read_weights(path)
    if meta.get("format") != FORMAT or not {"refs", "noise_var", "rotations", "shifts_A"} <= tensors.keys():
        raise InputError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
    try:
        state = AbinitState(int(meta["iteration"]), tensors["refs"], tensors["noise_var"],
                            tensors["rotations"].numpy(), tensors["shifts_A"].numpy(), json.loads(meta["history"]))
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    if state.refs.ndim != 4 or state.refs.shape[0] != 2 or len(state.history) != state.iteration:
        raise InputError(path, f"inconsistent checkpoint: references {tuple(state.refs.shape)}, iteration "
                               f"{state.iteration} with {len(state.history)} iterations of history")
    return state, settings


# ------------------------------------------------------------------------------------------------ schedule

def global_limit_A(it: int, s: AbinitSettings) -> float:
    """Band limit of global iteration ``it``: geometric from ini_high_A to global_high_A."""
    if s.n_global <= 1:
        return s.global_high_A
    f = it / (s.n_global - 1)
    return float(s.ini_high_A ** (1 - f) * s.global_high_A ** f)


def levels_for(limit_px: float, grid_step_deg: float) -> int:
    """Refinement levels after the base grid: halve the step until its band limit reaches ``limit_px``, then
    once more (at most 6)."""
    levels = 0
    step = math.radians(grid_step_deg)
    while RADIUS_PER_STEP / step < limit_px and levels < 6:
        step /= 2
        levels += 1
    return min(levels + 1, 6)


def level_resolution_A(step_deg: float, limit_px: float, box: int, apix: float) -> float:
    """Resolution a level with angular step ``step_deg`` scores: radius min(limit, 2 / step) pixels."""
    r = min(limit_px, max(2.0, RADIUS_PER_STEP / math.radians(step_deg)))
    return box * apix / r


# ------------------------------------------------------------------------------------------------ the fit

def _initial_reference(particles, rows: np.ndarray, lattice: Lattice, device: torch.device,
                       rng: np.random.Generator) -> torch.Tensor:
    """Reconstruction of the images ``rows`` at random orientations (no origins), on ``lattice``."""
    rows = np.sort(rows)
    prep = ImagePreparer(particles, lattice, device=device)
    F, C = prep.transforms(torch.from_numpy(particles.reader().read(rows)), rows), prep.ctf(rows)
    A = torch.as_tensor(Rotation.random(len(rows), random_state=rng).as_matrix(), dtype=torch.float32,
                        device=device)
    bp = BackProjector(lattice.box, 2, device)
    bp.insert(F, C, A)
    bp.flush()
    return bp.reconstruct(float(bp.weight.mean()))


def _noise_from_images(particles, rows: np.ndarray, lattice: Lattice, device: torch.device) -> torch.Tensor:
    """Mean |X|² per shell of the images ``rows`` on ``lattice``: signal plus noise, an over-estimate of the
    noise that makes the first posteriors broad."""
    prep = ImagePreparer(particles, lattice, device=device)
    points = lattice.half_plane()
    n_shells = lattice.box // 2 + 1
    sums = torch.zeros(n_shells, dtype=torch.float64, device=device)
    count = torch.zeros(n_shells, dtype=torch.float64, device=device)
    shell = points.shell.to(device)
    for s in range(0, len(rows), 256):
        r = np.sort(rows[s:s + 256])
        x = points.take(prep.transforms(torch.from_numpy(particles.reader().read(r)), r))
        sums.index_add_(0, shell, (x.real ** 2 + x.imag ** 2).sum(0).to(torch.float64))
        count.index_add_(0, shell, torch.full((len(shell),), float(len(r)), dtype=torch.float64, device=device))
    sums[0], count[0] = sums[1], count[1]  # the zero frequency is never scored
    return (sums / count.clamp_min(1)).to(torch.float32)


def _insert(bp: BackProjector, b: ImageBatch, idx: torch.Tensor, hyp: Hypotheses, weights: torch.Tensor) -> None:
    """Backproject images ``idx`` of the batch at each kept pose, centred by its origin, weighted by its
    posterior probability (poses under MIN_INSERT_PROBABILITY skipped, as classification does)."""
    F, C = b.images_ft[idx], b.ctf[idx]
    for k in range(hyp.scores.shape[1]):
        w = weights[:, k]
        sel = torch.nonzero(w >= MIN_INSERT_PROBABILITY).squeeze(1)
        if len(sel) == 0:
            continue
        sw = w[sel].sqrt().to(torch.float32)[:, None, None]
        Fk = undo_origin(F[sel], hyp.shifts_px[sel, k]).to(torch.complex64)
        bp.insert(Fk * sw, C[sel] * sw, hyp.rotations[sel, k])


def _search(sc: PoseScorer, F: torch.Tensor, C: torch.Tensor, s: AbinitSettings, is_global: bool, grid: torch.Tensor,
            shifts0: torch.Tensor, limit_px: float, levels: int, max_shift_px: float,
            start: tuple[torch.Tensor, torch.Tensor] | None) -> Hypotheses:
    """The kept poses of images F (CTF C; grids on the scorer's lattice) against one reference: the hierarchical
    global search, or the local levels around ``start`` (rotations (B, 3, 3), origins (B, 2) px)."""
    b, apix = sc.lattice.box, sc.lattice.apix
    if is_global:
        step = s.grid_step_deg
        step_s = float(shifts0[1, 0] - shifts0[0, 0]) if len(shifts0) > 1 else 0.0
        coarse = sc.limited(level_resolution_A(step, limit_px, b, apix))
        hyp = grid_search(coarse, coarse.take(F), coarse.take(C), grid, shifts0, s.keep)
        for _ in range(levels):
            step, step_s = step / 2, step_s / 2
            fine = sc.limited(level_resolution_A(step, limit_px, b, apix))
            hyp = refine_hypotheses(fine, fine.take(F), fine.take(C), hyp, step, step_s, s.keep,
                                    max_shift_px=max_shift_px)
        return hyp
    step, step_s = 2 * math.degrees(RADIUS_PER_STEP / limit_px), LOCAL_SHIFT_PX
    hyp = Hypotheses(start[0][:, None], start[1][:, None], torch.zeros(len(F), 1, device=sc.device))
    x, c = sc.take(F), sc.take(C)
    for _ in range(LOCAL_LEVELS):
        step, step_s = step / 2, step_s / 2
        hyp = refine_hypotheses(sc, x, c, hyp, step, step_s, s.keep_local, max_shift_px=max_shift_px)
    return hyp


def _initial_state(particles, s: AbinitSettings, full: Lattice, reference: torch.Tensor | None,
                   device: torch.device, rng: np.random.Generator) -> AbinitState:
    """The reference at ini_high_A (the user's map, or a random-orientation reconstruction of a few images), the
    noise from the images' power and identity poses."""
    N = len(particles)
    b0 = box_for_resolution(full.box, full.apix, s.ini_high_A)
    if reference is not None:
        ref = fourier_resize_3d(lowpass_map(reference.to(device, torch.float32), full.apix, s.ini_high_A), b0)
    else:
        pick = rng.choice(N, size=min(N, s.init_particles), replace=False)
        ref = _initial_reference(particles, pick, full.cropped(b0), device, rng)
    noise = _noise_from_images(particles, rng.choice(N, size=min(N, 1000), replace=False), full, device)
    return AbinitState(0, torch.stack([ref, ref]).cpu(), noise.cpu(), np.tile(np.eye(3, dtype=np.float32), (N, 1, 1)),
                       np.zeros((N, 2)), [])


def fit_abinit(particles, half: np.ndarray, settings: AbinitSettings, device: torch.device, *,
               reference: torch.Tensor | None = None, seed: int = 0, log: logging.Logger | None = None,
               progress: Progress | None = None, checkpoint: Path | None = None, resume: bool = False) -> AbinitFit:
    """Poses and a map of ``particles`` (any poses or origins they carry are ignored); ``half`` (N,) 1 or 2.

    ``reference``: an optional starting map (n, n, n) on the particles' box and pixel size. ``checkpoint``: the
    state is written there after every iteration; ``resume`` continues from it (InputError when it was written
    with other settings).
    """
    log = log or logging.getLogger("cryohet")
    track = progress or (lambda items, desc, total: items)
    s = settings
    n0, apix = int(particles.box), float(particles.apix)
    N = len(particles)
    blind = replace(particles, shift_A=np.zeros((N, 2)), euler_deg=np.zeros((N, 3)))
    full = Lattice(n0, apix)
    cap_A = max(s.resolution_A, 2 * apix)
    if s.global_high_A < cap_A or s.ini_high_A < s.global_high_A:
        raise ValueError(f"the band limits must satisfy ini_high_A ({s.ini_high_A:g} Å) >= global_high_A "
                         f"({s.global_high_A:g} Å) >= the resolution limit ({cap_A:g} Å, Nyquist at {2 * apix:g})")
    max_shift_A = s.shift_range_A(n0, apix)
    radius_A = s.diameter_A(n0, apix) / 2
    if radius_A > n0 * apix / 2:
        raise InputError(getattr(particles, "source", None), f"the particle diameter {2 * radius_A:g} Å is wider "
                                                             f"than the box ({n0 * apix:g} Å)")
    run_settings = {"n_particles": N, "box": n0, "apix": round(apix, 6), "seed": seed,
                    "reference": reference is not None,
                    **{k: v for k, v in vars(s).items() if k not in ("batch_size", "n_local")}}
    rng = np.random.default_rng([seed, 0xAB1])
    found = load_checkpoint(checkpoint, read_state, run_settings, log) if resume and checkpoint else None
    if found is not None:
        used, state = found
        log.info("resuming from %s after iteration %d", used, state.iteration)
    else:
        state = _initial_state(blind, s, full, reference, device, rng)
    total = s.n_global + s.n_local
    best_prob = np.ones(N, dtype=np.float32)
    best_score = np.zeros(N, dtype=np.float32)
    grid = so3_grid(s.grid_step_deg).to(device)
    while state.iteration < total:
        it = state.iteration
        is_global = it < s.n_global
        if is_global:
            limit_A = max(global_limit_A(it, s), cap_A)
        else:
            res_A = state.history[-1]["resolution_A"]
            limit_px = min(n0 / 2, n0 * apix / res_A + MARGIN_SHELLS)
            limit_A = max(n0 * apix / limit_px, cap_A)
        b = box_for_resolution(n0, apix, limit_A)
        lat = full.cropped(b)
        limit_px = b * lat.apix / limit_A
        prep = ImagePreparer(blind, lat, device=device)
        solvent = sphere_mask(b, radius_A / lat.apix, SOLVENT_EDGE_A / lat.apix, device)
        noise_b = state.noise_var[: b // 2 + 1].to(device) * crop_scale(n0, b) ** 2
        refs = [fourier_resize_3d(r.to(device), b) for r in state.refs]
        if is_global:  # one reference (positive density) for both half-sets
            refs = [((refs[0] + refs[1]) / 2).clamp_min(0)] * 2
        scorers = [PoseScorer(lowpass_map(r, lat.apix, limit_A) * solvent, lat, limit_A, noise_b, chunk=2048,
                              fit_scale=is_global) for r in refs]
        shifts0 = shift_grid(max_shift_A / lat.apix).to(device)
        levels = levels_for(limit_px, s.grid_step_deg)
        bps = [BackProjector(b, 2, device) for _ in (1, 2)]
        res_sum = torch.zeros(b // 2 + 1, dtype=torch.float64, device=device)
        res_count = torch.zeros_like(res_sum)
        order = np.arange(N)
        if is_global and it < s.n_global - 1 and s.global_subset < N:
            order = np.sort(np.random.default_rng([seed, 0x5B, it]).choice(N, s.global_subset, replace=False))
        rows = [order[r0:r0 + s.batch_size] for r0 in range(0, len(order), s.batch_size)]
        desc = f"iteration {it + 1}/{total} ({'global' if is_global else 'local'}, {limit_A:.1f} Å)"
        batches: Iterable[ImageBatch] = track(BatchStream(blind.reader(), rows, prep, prefetch=2), desc, len(rows))
        for batch in batches:
            h = half[batch.rows]
            for j in (0, 1):
                sel = np.nonzero(h == j + 1)[0]
                if len(sel) == 0:
                    continue
                idx = torch.as_tensor(sel, device=device)
                F, C = batch.images_ft[idx], batch.ctf[idx]
                prow = batch.rows[sel]
                sc = scorers[j]
                start = None if is_global else (
                    torch.as_tensor(state.rotations[prow], device=device),
                    torch.as_tensor(state.shifts_A[prow] / lat.apix, dtype=torch.float32, device=device))
                hyp = _search(sc, F, C, s, is_global, grid, shifts0, limit_px, levels, max_shift_A / lat.apix, start)
                weights = hyp.posterior()
                _insert(bps[j], batch, idx, hyp, weights)
                best_r, best_s = hyp.rotations[:, 0], hyp.shifts_px[:, 0]
                ps, pc = sc.residual_power(sc.take(F), sc.take(C), best_r, best_s)
                res_sum += ps
                res_count += pc
                state.rotations[prow] = best_r.cpu().numpy()
                state.shifts_A[prow] = best_s.cpu().numpy().astype(np.float64) * lat.apix
                best_prob[prow] = weights[:, 0].cpu().numpy()
                best_score[prow] = hyp.scores[:, 0].cpu().numpy()
        halves, _, raw_fsc = wiener_reconstruct(bps, "auto")
        res_A = float(resolution_at(raw_fsc, b, lat.apix, 0.143))
        measured = res_count > 0
        noise = state.noise_var.clone().to(device)
        noise[: b // 2 + 1][measured] = (res_sum[measured] / res_count[measured]).to(torch.float32) \
            / crop_scale(n0, b) ** 2
        entry = {"iteration": it + 1, "phase": "global" if is_global else "local", "limit_A": limit_A, "box": b,
                 "resolution_A": res_A, "mean_max_probability": float(best_prob.mean()),
                 "mean_log_likelihood": float(best_score.mean())}
        state = AbinitState(it + 1, torch.stack(halves).cpu(), noise.cpu(), state.rotations, state.shifts_A,
                            state.history + [entry])
        log.info("iteration %d/%d (%s): band limit %.1f Å at box %d; half-map FSC 0.143 at %.1f Å; mean best-pose "
                 "probability %.2f", it + 1, total, entry["phase"], limit_A, b, res_A, entry["mean_max_probability"])
        if checkpoint is not None:
            save_state(checkpoint, state, run_settings)
    return _final_maps(blind, half, state, full, device, track, s.batch_size, best_prob, best_score)


def _final_maps(particles, half: np.ndarray, state: AbinitState, lattice: Lattice, device: torch.device, track,
                batch_size: int, best_prob: np.ndarray, best_score: np.ndarray) -> AbinitFit:
    """Half-maps, map and FSC at the full box from the final poses (the best pose of every particle)."""
    n = lattice.box
    prep = ImagePreparer(replace(particles, shift_A=state.shifts_A.copy()), lattice, device=device)
    bps = [BackProjector(n, 2, device) for _ in (1, 2)]
    N = len(particles)
    rows = [np.arange(r0, min(N, r0 + batch_size)) for r0 in range(0, N, batch_size)]
    for b in track(BatchStream(particles.reader(), rows, prep, prefetch=2), "final reconstruction", len(rows)):
        A = torch.as_tensor(state.rotations[b.rows], device=device)
        h = half[b.rows]
        for j in (0, 1):
            sel = torch.as_tensor(np.nonzero(h == j + 1)[0], device=device)
            if len(sel):
                bps[j].insert(b.images_ft[sel], b.ctf[sel], A[sel])
    halves, full_map, raw_fsc = wiener_reconstruct(bps, "auto")
    return AbinitFit(full_map, torch.stack(halves), raw_fsc, state.rotations, state.shifts_A, best_prob, best_score,
                     state.history, lattice.apix)
