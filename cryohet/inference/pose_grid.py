"""Global pose search: a grid on SO(3) × shifts scored for every image, then coarse-to-fine refinement of the best.

As cryoDRGN2's hierarchical search: the base grid (:func:`so3_grid`, ~4,400 rotations at its default 15° step, as
cryoDRGN's 4,608) is scored against every image for every origin of a shift grid (:meth:`PoseScorer.score_grid`:
one slice per rotation shared by all images), the ``keep`` best (rotation, shift) pairs of each image survive, and
each refinement level (:func:`refine_hypotheses`) scores the 27 rotations ΔR(v) · A, v ∈ {−a, 0, a}³, and the 9
origins {−t, 0, t}² around every survivor with a and t half the previous level's, keeping the ``keep`` best again.
Each level may score a finer band limit (``PoseScorer.limited``), so the coarse levels cost little (frequency
marching). Memory depends on the batch of images, never on the number of particles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryohet.geometry.euler import euler_to_matrix
from cryohet.inference.pose_search import PoseScorer, _offsets, rotation_from_vector


def so3_grid(step_deg: float) -> torch.Tensor:
    """Rotations (H, 3, 3) (RELION matrices) covering SO(3) about every ``step_deg``: projection directions on a
    Fibonacci sphere with one direction per step² of solid angle, times in-plane angles every step."""
    if not 0 < step_deg <= 90:
        raise ValueError(f"the grid step must be in (0, 90] degrees, got {step_deg}")
    step = math.radians(step_deg)
    n_dir = max(2, math.ceil(4 * math.pi / step ** 2))
    n_psi = max(1, math.ceil(360 / step_deg))
    i = torch.arange(n_dir, dtype=torch.float64)
    tilt = torch.rad2deg(torch.arccos(1 - (2 * i + 1) / n_dir))
    rot = torch.rad2deg(torch.remainder(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi))
    psi = torch.arange(n_psi, dtype=torch.float64) * (360 / n_psi)
    euler = torch.stack([rot[:, None].expand(n_dir, n_psi), tilt[:, None].expand(n_dir, n_psi),
                         psi[None, :].expand(n_dir, n_psi)], -1).reshape(-1, 3)
    return euler_to_matrix(euler).to(torch.float32)


def sphere_grid(step_deg: float) -> torch.Tensor:
    """The rotations of :func:`so3_grid` with in-plane angle 0 (H, 3, 3): one per projection direction, every
    ``step_deg`` on the sphere (a quadrature for functions invariant to in-plane rotations)."""
    return so3_grid(step_deg)[::max(1, math.ceil(360 / step_deg))]


def shift_grid(max_shift_px: float, n_per_axis: int = 7) -> torch.Tensor:
    """Origins (S, 2) in pixels: an ``n_per_axis`` × ``n_per_axis`` grid over [−max, max]² (zero only for 0)."""
    if max_shift_px <= 0 or n_per_axis < 2:
        return torch.zeros(1, 2)
    t = torch.linspace(-max_shift_px, max_shift_px, n_per_axis)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)


@dataclass
class Hypotheses:
    """The best poses kept per image, best first."""

    rotations: torch.Tensor   # (B, K, 3, 3) RELION matrices
    shifts_px: torch.Tensor   # (B, K, 2) further origins (px of the scorer's lattice, RELION sign)
    scores: torch.Tensor      # (B, K) log-likelihoods

    def posterior(self) -> torch.Tensor:
        """(B, K) normalised weights exp(score) over the kept poses."""
        return torch.softmax(self.scores, dim=1)


def grid_search(scorer: PoseScorer, x: torch.Tensor, c: torch.Tensor, rotations: torch.Tensor,
                shifts_px: torch.Tensor, keep: int) -> Hypotheses:
    """The ``keep`` best (rotation, origin) pairs of every image among ``rotations`` (H, 3, 3) × ``shifts_px``
    (S, 2), for transforms ``x`` and CTF ``c`` at the scorer's pixels (B, M)."""
    scores = scorer.score_grid(x, c, rotations, shifts_px)  # (B, H, S)
    B, H, S = scores.shape
    top, flat = scores.reshape(B, -1).topk(min(keep, H * S), dim=1)
    rot = rotations.to(scorer.device)[flat // S]
    shift = shifts_px.to(scorer.device)[flat % S]
    return Hypotheses(rot, shift, top)


def refine_hypotheses(scorer: PoseScorer, x: torch.Tensor, c: torch.Tensor, hyp: Hypotheses, angle_step_deg: float,
                      shift_step_px: float, keep: int, max_shift_px: float | None = None) -> Hypotheses:
    """One refinement level: around each kept pose, the 27 rotations ΔR(v) · A (v ∈ {−a, 0, a}³, image frame)
    with the 9 origins {−t, 0, t}² around its own origin; the ``keep`` best of all of them per image. Origins
    outside the square [−max_shift_px, max_shift_px]² (that of :func:`shift_grid`) are not taken (None: no
    bound). ``x``, ``c``: at the scorer's pixels."""
    device = scorer.device
    dR = rotation_from_vector(_offsets(math.radians(angle_step_deg), 3, device))  # (27, 3, 3)
    dS = _offsets(shift_step_px, 2, device)  # (9, 2)
    B, K = hyp.scores.shape
    rots, shifts, scores = [], [], []
    for k in range(K):
        cand_A = dR[None] @ hyp.rotations[:, k, None].to(device)  # (B, 27, 3, 3)
        cand_s = hyp.shifts_px[:, k, None].to(device) + dS[None]  # (B, 9, 2)
        sc = scorer.score_points(x, c, cand_A, cand_s)  # (B, 27, 9)
        if max_shift_px is not None:
            sc = sc.masked_fill((cand_s.abs() > max_shift_px + 1e-6).any(-1)[:, None, :], -math.inf)
        rots.append(cand_A[:, :, None].expand(B, len(dR), len(dS), 3, 3).reshape(B, -1, 3, 3))
        shifts.append(cand_s[:, None].expand(B, len(dR), len(dS), 2).reshape(B, -1, 2))
        scores.append(sc.reshape(B, -1))
    rots_all, shifts_all, scores_all = torch.cat(rots, 1), torch.cat(shifts, 1), torch.cat(scores, 1)
    top, idx = _distinct_top(scores_all, keep)
    rows = torch.arange(B, device=device)[:, None]
    return Hypotheses(rots_all[rows, idx], shifts_all[rows, idx], top)


def _distinct_top(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best scores per row (B, H) and their indices, a pose reached twice counted once.

    Neighbourhoods of kept poses overlap (ΔR(a/2) around a pose is ΔR(−a/2) around its neighbour at a), and the
    same pose twice would count twice in a posterior. Equal poses have equal scores, so a score within float
    precision of the better one before it is a repeat: it is passed over (or, when fewer than ``keep`` distinct
    poses exist, kept with score −inf, i.e. no weight)."""
    top, idx = scores.topk(min(4 * keep, scores.shape[1]), dim=1)
    tol = 1e-5 * top.abs().clamp_min(1.0)
    repeat = torch.zeros_like(top, dtype=torch.bool)
    repeat[:, 1:] = (top[:, :-1] - top[:, 1:]) <= tol[:, 1:]
    order = torch.argsort(repeat.to(torch.int8), dim=1, stable=True)[:, :keep]
    top = torch.where(torch.gather(repeat, 1, order), -math.inf, torch.gather(top, 1, order))
    return top, torch.gather(idx, 1, order)
