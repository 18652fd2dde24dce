"""Heterogeneous ab initio: a conformational model (neural decoder and encoder or latent table) and every
particle's pose, from images with CTF and no poses (cryoDRGN2's ``abinit_het`` class).

1. **Consensus**: the homogeneous ab initio (:func:`~cryohet.inference.abinit.fit_abinit`: global hierarchical
   search with frequency marching, then local gold-standard refinement) gives a map and first poses. The
   conformations blur it, but the shared parts fix every pose to a few degrees.
2. **Alternation** (``rounds`` times): (a) the VAE (or auto-decoder) is trained with the poses fixed for
   ``epochs`` epochs on the shared trainer (:func:`~cryohet.inference.fit_neural.fit_neural`; one optimisation
   continued across rounds from its checkpoint), then (b) every image's pose is re-searched locally against the
   model's slice at the image's own latent (:func:`~cryohet.inference.decoder_poses.research_poses`), so the
   parts that move stop pulling the poses towards the consensus' average.
3. A last ``epochs`` of training on the final poses gives the model and the latents.

The state after each re-search (poses, round, history) is written to ``het_state.safetensors``; with the
consensus' and the trainer's own checkpoints a stopped run resumes where it was.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cryohet.geometry.euler import matrix_to_euler
from cryohet.geometry.lattice import Lattice
from cryohet.inference.abinit import AbinitFit, AbinitSettings, fit_abinit
from cryohet.inference.decoder_poses import ResearchSettings, research_poses
from cryohet.inference.em_state import load_checkpoint
from cryohet.inference.fit_neural import fit_neural
from cryohet.inference.pose_state import PoseRoundState, read_pose_state, save_pose_state
from cryohet.inference.trainer import CHECKPOINT_NAME, TrainOptions, TrainResult
from cryohet.models.neural import VolumeConfig

FORMAT = "cryohet-abinit-het-state-1"
STATE_NAME = "het_state.safetensors"
CONSENSUS_CHECKPOINT = "consensus_checkpoint.safetensors"
VAE_DIR = "vae"


@dataclass
class HetSettings:
    """The alternation of training and pose re-search."""

    rounds: int = 2                  # pose re-searches
    epochs: int = 10                 # training epochs before each re-search and after the last
    search: ResearchSettings = field(default_factory=ResearchSettings)


@dataclass
class HetFit:
    consensus: AbinitFit             # the homogeneous phase (map, half-maps, FSC, its poses)
    objective: nn.Module             # the trained decoder and its inference
    result: TrainResult              # the last training stage (z_mu, z_logvar, history)
    euler_deg: np.ndarray            # (N, 3) final poses
    shift_A: np.ndarray              # (N, 2)
    history: list[dict[str, Any]]    # one entry per re-search


def fit_abinit_het(pset, half: np.ndarray, abinit: AbinitSettings, het: HetSettings, cfg: VolumeConfig,
                   inference: dict[str, Any], opts: TrainOptions, out_dir: str | Path, device: torch.device,
                   ctx: Any | None = None, *, beta: float = 0.0, window_radius: float = 0.85,
                   reference: torch.Tensor | None = None, seed: int = 0, resume: bool = False) -> HetFit:
    """Consensus, then ``het.rounds`` × (train, re-search poses), then train: see the module's description.

    ``cfg``: the decoder (its box may be a Fourier crop of the images'); ``inference``: ``kind`` and settings as
    for train-vae; ``opts.epochs`` is ignored (``het.epochs`` per stage). Checkpoints go in ``out_dir``."""
    out = Path(out_dir)
    log = getattr(ctx, "log", None) or logging.getLogger("cryohet")
    consensus = fit_abinit(pset, half, abinit, device, reference=reference, seed=seed, log=log,
                           progress=getattr(ctx, "progress", None), checkpoint=out / CONSENSUS_CHECKPOINT,
                           resume=resume)
    settings = {"n_particles": len(pset), "rounds": het.rounds, "epochs": het.epochs,
                "search": asdict(het.search), "model": cfg.architecture(), "inference": inference}
    found = load_checkpoint(out / STATE_NAME, partial(read_pose_state, fmt=FORMAT), settings, log) if resume else None
    if found is not None:
        state = found[1]
        log.info("resuming after pose re-search %d of %d", state.round, het.rounds)
    else:
        state = PoseRoundState(0, matrix_to_euler(consensus.rotations.astype(np.float64)),
                               consensus.shifts_A.copy(), [])
    lattice = Lattice(int(pset.box), float(pset.apix)).cropped(cfg.box)
    vae_dir = out / VAE_DIR
    vae_dir.mkdir(exist_ok=True)
    while True:
        posed = replace(pset, euler_deg=state.euler_deg.copy(), shift_A=state.shift_A.copy())
        stage = replace(opts, epochs=(state.round + 1) * het.epochs)
        log.info("training stage %d of %d: to epoch %d on the %s poses", state.round + 1, het.rounds + 1,
                 stage.epochs, "consensus" if state.round == 0 else f"re-searched ({state.round})")
        objective, result = fit_neural(posed, cfg, inference, stage, vae_dir, device, ctx, beta=beta,
                                       window_radius=window_radius,
                                       # a fresh run's later stages continue its own training; a stale
                                       # checkpoint of an earlier run in the folder is only resumed on --resume
                                       resume=(resume or state.round > 0) and (vae_dir / CHECKPOINT_NAME).exists())
        if state.round >= het.rounds:
            return HetFit(consensus, objective, result, state.euler_deg, state.shift_A, state.history)
        moved = research_poses(posed, objective.decoder, result.z_mu, lattice, cfg.data_scale, het.search,
                               device, window_radius, getattr(ctx, "progress", None))
        entry = {"round": state.round + 1, "median_moved_deg": float(np.median(moved.moved_deg)),
                 "mean_gain": float(moved.gain.mean()), "epoch": stage.epochs}
        log.info("pose re-search %d of %d: rotations moved by %.2f° (median), log-likelihood gained %.4g per image "
                 "(mean)", state.round + 1, het.rounds, entry["median_moved_deg"], entry["mean_gain"])
        state = PoseRoundState(state.round + 1, moved.euler_deg, moved.shift_A, state.history + [entry])
        save_pose_state(out / STATE_NAME, state, settings, FORMAT)
