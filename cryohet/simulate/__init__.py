"""Simulated data with ground truth: the bundled molecule, atoms -> maps, motions, particle images."""
from __future__ import annotations

from cryohet.simulate.density import atoms_to_map, particle_radius_A
from cryohet.simulate.molecules import default_molecule, load_structure, select_residues
from cryohet.simulate.motions import (
    Conformations,
    Hinge,
    auto_hinge,
    default_hinges,
    discrete_conformations,
    fit_hinge,
    hinge_conformations,
    interpolation_conformations,
    maps_conformations,
    two_part_conformations,
)
from cryohet.simulate.simulate import SimulationOutput, draw_particles, simulate_particles

__all__ = [
    "Conformations", "Hinge", "SimulationOutput", "atoms_to_map", "auto_hinge", "default_hinges", "default_molecule",
    "discrete_conformations", "draw_particles", "fit_hinge", "hinge_conformations", "interpolation_conformations",
    "load_structure", "maps_conformations", "particle_radius_A", "select_residues", "simulate_particles",
    "two_part_conformations",
]
