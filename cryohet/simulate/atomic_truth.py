"""The bundled molecule's LID hinge with its atomic ground truth in the particles' map frame.

``hinge_conformations`` renders the states about the mean of their centres of mass; here the same states are
moved so that this centre is the box centre (``io.atomic_model.box_centre_A``), the frame in which an atomic
model fitted to the maps lies (map origin 0). The open state (τ = 0) is the reference model; each state's Cα
positions are the truth a per-particle atomic model is compared with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cryohet.io.atomic_model import Atoms, box_centre_A, read_atoms
from cryohet.simulate.molecules import DEFAULT_MOLECULE, centre_of_mass, default_molecule
from cryohet.simulate.motions import Conformations, Hinge, default_hinges, hinge_conformations


@dataclass
class HingeTruth:
    conf: Conformations        # maps and τ of the states
    heavy: Atoms               # the open state's heavy atoms in the map frame (the reference model)
    ca_frames_A: np.ndarray    # (S, N_residues, 3) Cα positions of every state in the map frame, Å
    hinge: Hinge               # the LID hinge in the map frame (moving atoms of ``heavy``)
    max_angle_deg: float       # its angle at τ = 1


def hinge_truth(n_states: int = 20, max_angle_deg: float = 50.0, box: int = 40, apix: float = 3.0,
                resolution_A: float = 8.0) -> HingeTruth:
    """States of the LID closing by τ·max_angle_deg (τ = 0…1), their maps and atoms in the map frame."""
    conf = hinge_conformations(default_molecule(), n_states, max_angle_deg, box, apix, resolution_A)
    heavy = read_atoms(DEFAULT_MOLECULE, "heavy")
    hinge = default_hinges()["LID"][0]
    models = np.stack([hinge.apply(heavy.xyz_A, a) for a in conf.meta["angle_deg"]])
    centre = np.mean([centre_of_mass(x, heavy.weight) for x in models], axis=0)
    shift = box_centre_A(box, apix) - centre
    models += shift
    ca = heavy.name == "CA"
    return HingeTruth(conf, dataclasses.replace(heavy, xyz_A=models[0]), models[:, ca],
                      Hinge(hinge.moving, hinge.point_A + shift, hinge.axis), float(max_angle_deg))
