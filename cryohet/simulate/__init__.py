"""Simulated data with ground truth: the bundled molecule, atoms -> maps, motions, particle images.

The names below are imported from their modules when first used, so that importing a light submodule
(``cryohet.simulate.views``, which the command line's help reads) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "atoms_to_map": "density", "particle_radius_A": "density",
    "default_molecule": "molecules", "load_structure": "molecules", "select_residues": "molecules",
    "Conformations": "motions", "Hinge": "motions", "auto_hinge": "motions", "default_hinges": "motions",
    "discrete_conformations": "motions", "fit_hinge": "motions", "hinge_conformations": "motions",
    "interpolation_conformations": "motions", "maps_conformations": "motions", "two_part_conformations": "motions",
    "SimulationOutput": "simulate", "draw_particles": "simulate", "simulate_particles": "simulate",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
