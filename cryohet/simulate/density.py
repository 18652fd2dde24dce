"""Atoms -> density map: a sum of Gaussians (one per atom, weight = atomic number), as
``cryohet.geometry.gaussians.gaussian_map`` renders them (ChimeraX ``molmap``'s width, band-limited at the
resolution).

Map layout is RELION's: array (z, y, x); the voxel at index ``box // 2`` is the point ``centre_A``.
"""
from __future__ import annotations

import gemmi
import numpy as np
import torch

from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION, gaussian_map, lowpass_map  # noqa: F401  (re-exported)
from cryohet.io.atomic_model import atom_coords, atom_weights
from cryohet.simulate.molecules import centre_of_mass


def atoms_to_map(structure_or_coords: gemmi.Structure | np.ndarray, box: int, apix: float,
                 resolution_A: float = 6.0, centre_A: np.ndarray | None = None, weights: np.ndarray | None = None,
                 device: torch.device | str = "cpu", chunk_atoms: int = 4096) -> np.ndarray:
    """Density map (box, box, box) float32 of an atomic model, (z, y, x), centred in the box.

    ``structure_or_coords``: a gemmi.Structure or positions (N, 3) in Å (x, y, z). ``weights`` (N,) default to
    the atomic numbers (1 for bare coordinates). ``centre_A`` (x, y, z) is placed at voxel ``box // 2``; it
    defaults to the weighted centre of mass, pass one common centre for all states of a motion.
    Units: electrons per Å³ (before the low-pass).
    """
    if isinstance(structure_or_coords, gemmi.Structure):
        xyz = atom_coords(structure_or_coords)
        if weights is None:
            weights = atom_weights(structure_or_coords)
    else:
        xyz = np.asarray(structure_or_coords, dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(xyz):
        raise ValueError(f"{len(w)} weights for {len(xyz)} atoms")
    centre = centre_of_mass(xyz, w) if centre_A is None else np.asarray(centre_A, dtype=np.float64)
    return gaussian_map(xyz, w, box, apix, resolution_A, centre, device, chunk_atoms)


def particle_radius_A(maps: np.ndarray, apix: float, fraction: float = 0.02) -> float:
    """Radius (Å) around the box centre that holds every voxel above ``fraction`` of the maximum of any map."""
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    box = maps.shape[-1]
    support = (maps > fraction * maps.max()).any(axis=0)
    idx = np.argwhere(support) - box // 2
    if len(idx) == 0:
        return box * apix / 4
    return float(np.sqrt((idx.astype(np.float64) ** 2).sum(1)).max() * apix)
