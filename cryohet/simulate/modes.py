"""Simulated data whose motion is a known combination of normal modes (ground truth for ``fit-modes``).

Structures x0 + Σ_k z_k·sqrt(N)·u_k (z in Å of RMS displacement over the N atoms, as ``models.modes``) at drawn
amplitudes are rendered as maps (``atoms_to_map`` about the box centre, so the atoms' map-frame positions are
where the particles show them) and handed to ``simulate_particles`` as a family of states whose coordinates
``tau`` are the amplitudes: the STAR's ``cryohetTrueTau1..K`` and ``ground_truth.npz``'s ``tau`` are then every
particle's true amplitudes.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from cryohet.io.atomic_model import Atoms, box_centre_A
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import centre_of_mass
from cryohet.simulate.motions import Conformations


def place_in_box(atoms: Atoms, box: int, apix: float) -> Atoms:
    """A copy of ``atoms`` moved so that their weighted centre is the box centre (the map frame)."""
    xyz = atoms.xyz_A - centre_of_mass(atoms.xyz_A, atoms.weight) + box_centre_A(box, apix)
    return dataclasses.replace(atoms, xyz_A=xyz)


def draw_amplitudes(n_states: int, sigma_A: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n_states, K) amplitudes, Å RMS: independent normals of standard deviations ``sigma_A`` (K,)."""
    sigma = np.asarray(sigma_A, np.float64)
    return rng.normal(size=(n_states, len(sigma))) * sigma


def mode_conformations(atoms: Atoms, modes: np.ndarray, amplitudes_A: np.ndarray, box: int, apix: float,
                       resolution_A: float, device: str = "cpu") -> Conformations:
    """Maps of ``atoms`` (map frame) moved by ``amplitudes_A`` (S, K) along ``modes`` (K, N, 3) unit vectors;
    ``tau`` = the amplitudes (kind continuous)."""
    amp = np.atleast_2d(np.asarray(amplitudes_A, np.float64))
    disp = np.asarray(modes, np.float64) * math.sqrt(len(atoms))
    if amp.shape[1] != len(disp):
        raise ValueError(f"{amp.shape[1]} amplitudes per state for {len(disp)} modes")
    centre = box_centre_A(box, apix)
    maps = np.stack([atoms_to_map(atoms.xyz_A + np.tensordot(a, disp, axes=1), box, apix, resolution_A,
                                  centre_A=centre, weights=atoms.weight, device=device) for a in amp])
    return Conformations(maps, amp, float(apix), "continuous", meta=dict(motion="normal_modes"))
