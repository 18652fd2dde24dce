"""Principal volumes with pose refinement: PPCA-EM (:mod:`cryohet.inference.ppca`) alternated with a local
re-search of every particle's pose against the fitted model's slice at that particle's coordinates.

PPCA is fitted by EM, not on the trainer, so the poses are refined as abinit-het refines them: after a fit,
each image's rotation and origin are searched locally (``local_search``: ±8°, ±4 Å by default, shrinking grids)
scoring the Gaussian log-likelihood of the image under the slice of X_0 + Σ_k b_k X_k at its own posterior
coordinates b, with the fit's noise spectrum σ²(shell); then PPCA is fitted again on the new poses. The poses after
each re-search are checkpointed (``pose_state.safetensors``) and each fit keeps its own EM checkpoint, so a stopped
run resumes where it was.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.inference.decoder_poses import DecoderScorer, ResearchResult, ResearchSettings, research_with
from cryohet.inference.em_state import load_checkpoint
from cryohet.inference.pose_state import PoseRoundState, read_pose_state, save_pose_state
from cryohet.inference.ppca import PrincipalVolumes, fit_principal_volumes

FORMAT = "cryohet-ppca-poses-state-1"
STATE_NAME = "pose_state.safetensors"


class LinearScorer(DecoderScorer):
    """``DecoderScorer.score`` for slices of X_0 + Σ_k z_k X_k, each image at its own coefficients ``coef`` (B, 1+K),
    weighted by 1 / σ² of each pixel (``weights`` (M,)): images and CTF are whitened, so the score is the
    log-likelihood under the fit's coloured noise. ``projectors``: one per map (X_0, X_1..X_K) on the lattice of
    ``kxy`` (cycles/pixel)."""

    def __init__(self, projectors: list[Projector], coef: torch.Tensor, kxy: torch.Tensor, weights: torch.Tensor):
        self.projectors, self.kxy, self.device = projectors, kxy, kxy.device
        self.coef = coef.to(self.device, torch.float32)
        self.root_w = weights.to(self.device, torch.float32).sqrt()

    @torch.no_grad()
    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        B, H = rotations.shape[:2]
        A = rotations.reshape(B * H, 3, 3).to(self.device, torch.float32)
        S = torch.stack([p.slice_points(A, self.kxy) for p in self.projectors], 1)      # (B H, J, M)
        c = self.coef.repeat_interleave(H, 0).to(S.dtype)
        return torch.einsum("rj,rjm->rm", c, S).reshape(B, H, -1)

    def score(self, images_ft: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
              shifts_px: torch.Tensor) -> torch.Tensor:
        w = self.root_w
        return super().score(images_ft.to(self.device) * w, ctf.to(self.device) * w, rotations, shifts_px)


def research_linear(pset: Any, fit: PrincipalVolumes, settings: ResearchSettings, device: torch.device,
                    track: Any = None) -> ResearchResult:
    """Every particle's pose of ``pset`` re-searched locally against ``fit``'s slices at its coordinates, on the
    fit's working lattice within its resolution circle (and ``settings.band_limit_A``), the images prepared as the
    fit prepares them."""
    lattice = Lattice(int(pset.box), float(pset.apix)).cropped(fit.work_box)
    n = lattice.box
    radius_px = min(n / 2, n * lattice.apix / max(fit.resolution_A, settings.band_limit_A))
    points = lattice.half_plane(radius_px)
    maps = np.concatenate([fit.mean[None], fit.components])
    projectors = [Projector(fourier_crop_3d(torch.as_tensor(m, device=device), n)) for m in maps]
    kxy = points.kxy.to(device)
    noise = torch.as_tensor(fit.noise_var, dtype=torch.float32, device=device)
    weights = 1.0 / noise[points.shell.to(device).clamp(max=len(noise) - 1)].clamp_min(1e-30)
    coef = torch.as_tensor(np.concatenate([np.ones((len(pset), 1)), fit.latents], 1), dtype=torch.float32)
    return research_with(pset, lambda rows: LinearScorer(projectors, coef[rows], kxy, weights), lattice, settings,
                         device, ImagePreparer(pset, lattice, points, device=device), track)


def fit_principal_volumes_posed(pset: Any, rounds: int, search: ResearchSettings, out_dir: str | Path,
                                fit_options: dict[str, Any], device: torch.device, *, resume: bool = False,
                                log: logging.Logger | None = None, track: Any = None
                                ) -> tuple[PrincipalVolumes, PoseRoundState]:
    """``rounds`` × (PPCA fit, pose re-search), then the final fit on the refined poses.

    ``fit_options``: ``fit_principal_volumes``'s keywords but ``checkpoint`` and ``resume`` (the fit after r
    re-searches is checkpointed to ``checkpoint.safetensors`` for r = 0, ``checkpoint_poses<r>.safetensors`` after).
    Returns the last fit and the pose state (its ``euler_deg``/``shift_A`` are the poses it was fitted on)."""
    log = log or logging.getLogger("cryohet.ppca")
    out = Path(out_dir)
    settings = {"n_particles": len(pset), "rounds": rounds, "search": asdict(search),
                "fit": {k: v for k, v in fit_options.items() if isinstance(v, (int, float, str, bool))}}
    found = load_checkpoint(out / STATE_NAME, partial(read_pose_state, fmt=FORMAT), settings, log) if resume else None
    if found is not None:
        state = found[1]
        log.info("resuming after pose re-search %d of %d", state.round, rounds)
    else:
        state = PoseRoundState(0, np.asarray(pset.euler_deg, dtype=np.float64).copy(),
                               np.asarray(pset.shift_A, dtype=np.float64).copy(), [])
    while True:
        posed = replace(pset, euler_deg=state.euler_deg.copy(), shift_A=state.shift_A.copy())
        name = "checkpoint.safetensors" if state.round == 0 else f"checkpoint_poses{state.round}.safetensors"
        fit = fit_principal_volumes(posed, checkpoint=out / name, resume=resume, log=log, device=device,
                                    **fit_options)
        if state.round >= rounds:
            return fit, state
        moved = research_linear(posed, fit, search, device, track)
        entry = {"round": state.round + 1, "median_moved_deg": float(np.median(moved.moved_deg)),
                 "mean_gain": float(moved.gain.mean())}
        log.info("pose re-search %d of %d: rotations moved by %.2f° (median), log-likelihood gained %.4g per image "
                 "(mean)", state.round + 1, rounds, entry["median_moved_deg"], entry["mean_gain"])
        state = PoseRoundState(state.round + 1, moved.euler_deg, moved.shift_A, state.history + [entry])
        save_pose_state(out / STATE_NAME, state, settings, FORMAT)
