"""Structural restraints of an atomic decoder (CryoSTAR's): an elastic network and a clash term, per image.

Elastic network: the springs of ``cryohet nma``'s ANM (every pair of residues within ``cutoff_A`` of each other in
the reference, ProDy's rule) keep their reference lengths: Σ_e w_e (|x_i − x_j| − d0_e)² / Σ_e w_e, Å², with w_e =
``bond_weight`` for the chain's bonded neighbours (consecutive residues of a chain, ``bonded_pairs``) and 1 for the
others, as CryoSTAR weighs its bond term above its distance term.

Clash: non-bonded pairs closer than ``min_distance_A`` (Cα–Cα 4 Å by default; real chains keep them ≥ ~4 Å) add
(min_distance_A − d)², summed per image and divided by the number of residues. The pairs come from a neighbour
list (a k-d tree per image on the detached positions), so its cost grows as N log N.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from cryohet.io.atomic_model import Atoms

#: ``cryohet nma``'s default cutoff of the elastic network, Å.
EN_CUTOFF_A = 15.0
#: Distance between the nodes of consecutive residues above which they are taken as not bonded (a chain break), Å:
#: Cα–Cα (3.8 Å in a chain) and, for nucleotides, P–P or C4'–C4' (about 6-7 Å).
MAX_BOND_A = {"CA": 4.5, "nucleotide": 8.0}


def bonded_pairs(atoms: Atoms, ca_only: bool = False) -> np.ndarray:
    """(P, 2) indices of consecutive residues of one chain (numbers i, i+1) closer than ``MAX_BOND_A``; with
    ``ca_only`` only Cα–Cα pairs."""
    i = np.arange(len(atoms) - 1)
    same = (atoms.chain[:-1] == atoms.chain[1:]) & (atoms.resseq[1:] - atoms.resseq[:-1] <= 1)
    ca = (atoms.name[:-1] == "CA") & (atoms.name[1:] == "CA")
    limit = np.where(ca, MAX_BOND_A["CA"], MAX_BOND_A["nucleotide"])
    close = np.linalg.norm(atoms.xyz_A[1:] - atoms.xyz_A[:-1], axis=1) < limit
    keep = i[same & close & (ca if ca_only else True)]
    return np.stack([keep, keep + 1], 1).astype(np.int64)


class Restraints(nn.Module):
    """Elastic-network and clash terms of positions (B, N, 3) Å of ``atoms``' residues; ``bonds`` (P, 2) the
    bonded pairs (None: the chain's, ``bonded_pairs``; an empty array for pseudo-atoms, which have no chain)."""

    def __init__(self, atoms: Atoms, cutoff_A: float = EN_CUTOFF_A, bond_weight: float = 30.0,
                 min_distance_A: float = 4.0, bonds: np.ndarray | None = None):
        super().__init__()
        xyz = np.asarray(atoms.xyz_A, np.float64)
        pairs = cKDTree(xyz).query_pairs(cutoff_A, output_type="ndarray").astype(np.int64)
        bonds = bonded_pairs(atoms) if bonds is None else np.asarray(bonds, np.int64).reshape(-1, 2)
        self._bond_keys = bonds[:, 0] * len(xyz) + bonds[:, 1]
        w = np.where(np.isin(pairs[:, 0] * len(xyz) + pairs[:, 1], self._bond_keys), bond_weight, 1.0)
        self.cutoff_A, self.bond_weight = float(cutoff_A), float(bond_weight)
        self.min_distance_A = float(min_distance_A)
        self.n_atoms = len(xyz)
        self.register_buffer("edges", torch.as_tensor(pairs), persistent=False)
        self.register_buffer("d0_A", torch.as_tensor(np.linalg.norm(xyz[pairs[:, 0]] - xyz[pairs[:, 1]], axis=1),
                                                     dtype=torch.float32), persistent=False)
        self.register_buffer("edge_weight", torch.as_tensor(w / w.sum(), dtype=torch.float32), persistent=False)

    def elastic(self, pos: torch.Tensor) -> torch.Tensor:
        """Mean over images of the weighted mean squared change of the network's spring lengths (Å²)."""
        d = (pos[:, self.edges[:, 0]] - pos[:, self.edges[:, 1]]).norm(dim=-1)
        return ((d - self.d0_A) ** 2 @ self.edge_weight).mean()

    def clash_pairs(self, pos: torch.Tensor) -> torch.Tensor:
        """(P, 3) rows (image, i, j) of non-bonded pairs closer than ``min_distance_A`` (a neighbour list)."""
        xyz = pos.detach().float().cpu().numpy()
        found = []
        for b, x in enumerate(xyz):
            p = cKDTree(x).query_pairs(self.min_distance_A, output_type="ndarray").astype(np.int64)
            if len(p):
                p = p[~np.isin(p[:, 0] * self.n_atoms + p[:, 1], self._bond_keys)]
                found.append(np.column_stack([np.full(len(p), b), p]))
        rows = np.concatenate(found) if found else np.zeros((0, 3), np.int64)
        return torch.as_tensor(rows, device=pos.device)

    def clash(self, pos: torch.Tensor) -> torch.Tensor:
        """Σ over clashing non-bonded pairs of (min_distance_A − d)², per image and per residue (Å²)."""
        rows = self.clash_pairs(pos)
        if len(rows) == 0:
            return pos.sum() * 0.0
        d = (pos[rows[:, 0], rows[:, 1]] - pos[rows[:, 0], rows[:, 2]]).norm(dim=-1)
        return ((self.min_distance_A - d).clamp_min(0) ** 2).sum() / (len(pos) * self.n_atoms)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(elastic, clash) of positions ``pos`` (B, N, 3) Å, each averaged over the images."""
        pos = pos.float()
        return self.elastic(pos), self.clash(pos)


def chain_geometry(atoms: Atoms, frames_A: np.ndarray, clash_A: float = 3.0) -> dict[str, float]:
    """Statistics of models ``frames_A`` (F, N, 3) Å: Cα–Cα bond lengths of bonded amino acids (mean, std, min,
    max, fraction outside 3.8 ± 0.3 Å) and non-bonded pairs closer than ``clash_A`` (count per model, closest)."""
    ca_bonds = bonded_pairs(atoms, ca_only=True)
    frames = np.atleast_3d(np.asarray(frames_A, np.float64)).reshape(-1, len(atoms), 3)
    lengths = np.linalg.norm(frames[:, ca_bonds[:, 0]] - frames[:, ca_bonds[:, 1]], axis=-1).ravel()
    bonds = bonded_pairs(atoms)
    bond_keys = set((bonds[:, 0] * len(atoms) + bonds[:, 1]).tolist())
    clashes, closest = 0, np.inf
    for x in frames:
        tree = cKDTree(x)
        p = [q for q in tree.query_pairs(max(clash_A, 6.0), output_type="ndarray").tolist()
             if q[0] * len(atoms) + q[1] not in bond_keys]
        if p:
            p = np.asarray(p)
            d = np.linalg.norm(x[p[:, 0]] - x[p[:, 1]], axis=1)
            clashes += int((d < clash_A).sum())
            closest = min(closest, float(d.min()))
    out = {"models": len(frames), "bond_mean_A": float(lengths.mean()) if len(lengths) else float("nan"),
           "bond_std_A": float(lengths.std()) if len(lengths) else float("nan"),
           "bond_min_A": float(lengths.min()) if len(lengths) else float("nan"),
           "bond_max_A": float(lengths.max()) if len(lengths) else float("nan"),
           "bonds_outside_3.8+-0.3_A": float((np.abs(lengths - 3.8) > 0.3).mean()) if len(lengths) else 0.0,
           "clashes_below_A": clash_A, "clashes_per_model": clashes / len(frames),
           "closest_nonbonded_A": closest if np.isfinite(closest) else None}
    return out
