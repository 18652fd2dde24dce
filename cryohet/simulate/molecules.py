"""Atomic models: the bundled default molecule, atom keys, residue selections (files are read by
``cryohet.io.atomic_model``).

The bundled molecule is E. coli adenylate kinase, chain A, in two states with the same atoms in the
same order: open (PDB 4AKE, ``default_molecule.pdb``) and closed (PDB 1AKE without its ligand,
``default_molecule_closed.pdb``, superposed on the open one by the CORE domain). Its LID and NMP domains
close independently over the CORE, a textbook continuous motion. Coordinates are in Å, centred on the
atomic-number-weighted centre of mass of the open state.
"""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np

from cryohet.io.atomic_model import (  # noqa: F401  (re-exported: the simulator's callers import them here)
    atom_coords,
    atom_weights,
    iter_atoms,
    load_structure,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MOLECULE = DATA_DIR / "default_molecule.pdb"
DEFAULT_MOLECULE_CLOSED = DATA_DIR / "default_molecule_closed.pdb"
#: Name given to the bundled structures (``gemmi.Structure.name``) so that code can recognise them.
DEFAULT_NAME = "cryohet_default_molecule"
#: Residue selections of the bundled molecule's domains (see ``select_residues``).
DEFAULT_DOMAINS = {"CORE": "A:1-29,A:60-121,A:160-214", "NMP": "A:30-59", "LID": "A:122-159"}


def default_molecule(closed: bool = False) -> gemmi.Structure:
    """The bundled adenylate kinase: open (default) or closed state, identical atom lists."""
    st = load_structure(DEFAULT_MOLECULE_CLOSED if closed else DEFAULT_MOLECULE)
    st.name = DEFAULT_NAME
    return st


def is_default_molecule(structure: gemmi.Structure) -> bool:
    return structure.name == DEFAULT_NAME


def atom_keys(structure: gemmi.Structure) -> list[tuple[str, int, str, str, str]]:
    """(chain, residue number, insertion code, residue name, atom name) of each atom, to match two models."""
    return [(c.name, r.seqid.num, r.seqid.icode.strip(), r.name, a.name) for c, r, a in iter_atoms(structure)]


def select_residues(structure: gemmi.Structure, spec: str) -> np.ndarray:
    """Boolean atom mask (N,) for a residue selection such as ``"A:122-159,A:30-59"`` or ``"10-50"``.

    Items are comma-separated ``[chain:]first-last`` or ``[chain:]number``; without a chain every chain matches.
    Raises ValueError for a malformed or empty selection.
    """
    ranges = []
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        chain, _, rng = item.rpartition(":")
        try:
            lo, _, hi = rng.partition("-") if not rng.startswith("-") else (rng, "", "")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"bad residue selection {item!r} (expected [chain:]first-last)") from None
        ranges.append((chain or None, first, last))
    if not ranges:
        raise ValueError(f"empty residue selection {spec!r}")
    mask = np.array([any((ch is None or ch == c.name) and lo <= r.seqid.num <= hi for ch, lo, hi in ranges)
                     for c, r, _ in iter_atoms(structure)], dtype=bool)
    if not mask.any():
        raise ValueError(f"residue selection {spec!r} matches no atom")
    return mask


def centre_of_mass(xyz: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted centre (3,) of positions (N, 3)."""
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    return (np.asarray(xyz) * w[:, None]).sum(0) / w.sum()


def kabsch(mobile: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R (3, 3) and translation t (3,) minimising |R mobile + t - target| (rows are points)."""
    w = np.ones(len(mobile)) if weights is None else np.asarray(weights, dtype=np.float64)
    pc, qc = centre_of_mass(mobile, w), centre_of_mass(target, w)
    h = ((mobile - pc) * w[:, None]).T @ (target - qc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, qc - rot @ pc


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square deviation (Å) between two (N, 3) position arrays, without superposition."""
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(-1).mean()))
