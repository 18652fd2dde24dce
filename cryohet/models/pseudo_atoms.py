"""Pseudo-atoms of a map: the nodes of an elastic network when no atomic model exists.

Rule: the voxels above a threshold, weighted by their density, are split into K clusters by weighted k-means
(Lloyd's iterations from a density-weighted random draw of K voxels); each pseudo-atom sits at its cluster's
density-weighted centre and carries its cluster's density (map value × Å³). This is vector quantisation of the
density (Situs' ``qvol``, Wriggers et al. 1998), the same aim as Xmipp/ContinuousFlex's pseudo-atoms (Jonić &
Sorzano 2016): points spread like the mass, about one per ``spacing_A``³ of the thresholded volume. Coordinates
are in the map's frame (map origin 0: voxel i at i·apix Å).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.io.atomic_model import Atoms

#: Lloyd's iterations stop when no centre moves more than this fraction of a voxel, or after ``MAX_ITER``.
TOL_VOXELS = 0.01
MAX_ITER = 200


@dataclass
class PseudoAtomFit:
    """The pseudo-atoms and how the k-means ended (largest centre move of the last iteration, Å)."""

    atoms: Atoms
    iterations: int
    last_move_A: float
    tol_A: float

    @property
    def converged(self) -> bool:
        return self.last_move_A <= self.tol_A


def pseudo_atom_count(volume: np.ndarray, apix: float, threshold: float, spacing_A: float) -> int:
    """One pseudo-atom per ``spacing_A``³ of the volume above ``threshold`` (at least one)."""
    return max(1, int(round(int((volume > threshold).sum()) * apix ** 3 / spacing_A ** 3)))


def _nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int) -> torch.Tensor:
    """Index of the nearest centre of each point, ``chunk`` points at a time."""
    out = torch.empty(len(points), dtype=torch.long, device=points.device)
    c2 = (centres ** 2).sum(1)
    for s in range(0, len(points), chunk):
        p = points[s:s + chunk]
        out[s:s + chunk] = (c2[None, :] - 2 * p @ centres.T).argmin(1)
    return out


def place_pseudo_atoms(volume: np.ndarray, apix: float, threshold: float, n_atoms: int, source: str | os.PathLike,
                       seed: int = 0, device: torch.device | str = "cpu", chunk_bytes: int = 1 << 27
                       ) -> PseudoAtomFit:
    """``n_atoms`` pseudo-atoms of ``volume`` (z, y, x) by weighted k-means of the voxels above ``threshold``.

    InputError naming ``source`` when fewer voxels than pseudo-atoms lie above the threshold."""
    device = torch.device(device)
    vol = np.asarray(volume, dtype=np.float32)
    idx = np.argwhere(vol > threshold)                                  # (V, 3) as (z, y, x)
    if len(idx) < n_atoms:
        raise InputError(source, f"{len(idx)} voxels lie above the threshold {threshold:g} (map values "
                                 f"{vol.min():.4g} to {vol.max():.4g}), fewer than the {n_atoms} pseudo-atoms "
                                 "asked for: lower --threshold or ask for fewer pseudo-atoms")
    pts = torch.as_tensor(idx[:, ::-1].copy() * float(apix), dtype=torch.float64, device=device)  # (x, y, z) Å
    w = torch.as_tensor(vol[tuple(idx.T)] - min(threshold, 0.0), dtype=torch.float64, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.multinomial(w.cpu(), n_atoms, replacement=False, generator=gen).to(device)
    centres = pts[first].clone()
    chunk = max(1, chunk_bytes // (8 * n_atoms))
    tol_A = TOL_VOXELS * float(apix)
    move, it = float("inf"), 0
    while it < MAX_ITER and move > tol_A:
        label = _nearest(pts, centres, chunk)
        mass = torch.zeros(n_atoms, dtype=w.dtype, device=device).index_add_(0, label, w)
        sums = torch.zeros_like(centres).index_add_(0, label, w[:, None] * pts)
        filled = mass > 0
        new = centres.clone()
        new[filled] = sums[filled] / mass[filled, None]
        move = float((new - centres).norm(dim=1).max())
        centres, it = new, it + 1
    label = _nearest(pts, centres, chunk)
    mass = torch.zeros(n_atoms, dtype=w.dtype, device=device).index_add_(0, label, w) * float(apix) ** 3
    n = n_atoms
    atoms = Atoms(xyz_A=centres.cpu().numpy(), weight=mass.cpu().numpy(), chain=np.full(n, "A"),
                  resseq=np.arange(1, n + 1), resname=np.full(n, "PSE"), name=np.full(n, "CA"),
                  element=np.full(n, "C"), source=Path(source))
    return PseudoAtomFit(atoms, it, move, tol_A)
