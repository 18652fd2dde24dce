"""Deformation error from two half-set models (DynaMight's gold standard for deformations).

Two models of the same Gaussians, each trained on one half of the particles, both encode every particle; the
particle's deformation error is the RMS over the Gaussians of the difference between the displacements the two
models give it:

    err_p = sqrt( mean_i |d¹_i(z¹_p) − d²_i(z²_p)|² )        (Å)

and each Gaussian's error is the same RMS taken over the particles instead. Where the data determine the motion
the two independent fits agree; where they do not (noise, too few particles, a part that does not move the same
way in both halves) the difference grows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryohet.data.prepare import ImagePreparer
from cryohet.distributed import Dist
from cryohet.inference.trainer import Hooks, Trainer, TrainOptions
from cryohet.io.reader import ImageReader
from cryohet.models.displaced_atoms import DisplacedAtoms


def encode_all(objective: nn.Module, reader: ImageReader, prep: ImagePreparer, opts: TrainOptions,
               device: torch.device, hooks: Hooks) -> np.ndarray:
    """Latent means (N, zdim) of every particle of ``reader`` (file order) under a trained ``objective``'s
    encoder, streamed through the shared trainer's inference pass."""
    objective.to(device)
    mu, _ = Trainer(objective, reader, prep, opts, Path("."), device, Dist(), hooks, {}).latents()
    return mu


@torch.no_grad()
def deformation_errors(model1: DisplacedAtoms, z1: np.ndarray, model2: DisplacedAtoms, z2: np.ndarray,
                       device: torch.device, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(per-particle error (N,) Å, per-Gaussian error (G,) Å) between the displacements of ``model1`` at ``z1``
    (N, d1) and of ``model2`` at ``z2`` (N, d2), ``chunk`` particles at a time."""
    if len(z1) != len(z2):
        raise ValueError(f"{len(z1)} and {len(z2)} latent points: one per particle in both halves expected")
    model1.to(device).eval()
    model2.to(device).eval()
    per_particle = np.empty(len(z1))
    sq = torch.zeros(len(model1.atoms), dtype=torch.float64, device=device)
    for s in range(0, len(z1), chunk):
        a = torch.as_tensor(z1[s:s + chunk], dtype=torch.float32, device=device)
        b = torch.as_tensor(z2[s:s + chunk], dtype=torch.float32, device=device)
        diff2 = ((model1.displacements(a) - model2.displacements(b)) ** 2).sum(-1).double()   # (B, G)
        per_particle[s:s + len(a)] = diff2.mean(1).sqrt().cpu().numpy()
        sq += diff2.sum(0)
    return per_particle, (sq / max(len(z1), 1)).sqrt().cpu().numpy()
