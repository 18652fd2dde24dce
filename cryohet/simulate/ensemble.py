"""A known ensemble for testing reweighting: frames along adenylate kinase's open -> closed transition, written
as a real trajectory (topology PDB, DCD, XTC, multi-model PDB and mmCIF), and particles drawn from a known mixture
of the frames.

The frames are the bundled molecule's heavy atoms linearly interpolated from the open to the closed state (closed
superposed on open by the atoms that move least), moved so that their mean centre of mass is the box centre, i.e.
in the frame of the particles' map (``cryohet.io.atomic_model.box_centre_A``). Each frame's map is rendered as
the reweighting renders it (``gaussian_map`` with the atomic numbers as weights, centred on the box centre).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import MDAnalysis as mda
import numpy as np
from MDAnalysis.coordinates.memory import MemoryReader

from cryohet.io.atomic_model import Atoms, box_centre_A, read_atoms, write_models
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import DEFAULT_MOLECULE, DEFAULT_MOLECULE_CLOSED, centre_of_mass
from cryohet.simulate.motions import Conformations, superpose_stable
from cryohet.simulate.simulate import SimulationOutput, simulate_particles


@dataclass
class EnsembleData:
    """Paths of a simulated ensemble and its truth."""

    topology: Path          # PDB of frame 1
    dcd: Path
    xtc: Path
    models_pdb: Path        # every frame, one model each
    models_cif: Path
    particles: SimulationOutput
    populations: np.ndarray  # (F,) fraction of the particles drawn from each frame (the realised mixture)
    weights: np.ndarray      # (F,) the mixture weights the particles were drawn with


def transition_frames(n_frames: int, box: int, apix: float) -> tuple[Atoms, np.ndarray]:
    """The bundled molecule's heavy atoms and ``n_frames`` frames (F, N, 3) Å from open to closed, in the map frame
    of a ``box`` of ``apix`` Å."""
    open_, closed = read_atoms(DEFAULT_MOLECULE, "heavy"), read_atoms(DEFAULT_MOLECULE_CLOSED, "heavy")
    xb = superpose_stable(open_.xyz_A, closed.xyz_A)
    t = np.linspace(0.0, 1.0, n_frames)[:, None, None]
    frames = (1 - t) * open_.xyz_A + t * xb
    mean_centre = np.mean([centre_of_mass(f, open_.weight) for f in frames], axis=0)
    return open_, frames + (box_centre_A(box, apix) - mean_centre)


def write_trajectory(path: str | os.PathLike, topology: str | os.PathLike, frames: np.ndarray) -> None:
    """Write ``frames`` (F, N, 3) Å of the atoms of ``topology`` with MDAnalysis' writer for the suffix (DCD, XTC)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = mda.Universe(str(topology))
        u.load_new(np.asarray(frames, dtype=np.float32), format=MemoryReader)
        with mda.Writer(str(path), len(u.atoms)) as w:
            for _ in u.trajectory:
                w.write(u.atoms)


def simulate_ensemble(out_dir: str | os.PathLike, weights: np.ndarray, n_particles: int, snr: float | None,
                      box: int = 48, apix: float = 3.0, resolution_A: float = 8.0, seed: int = 0) -> EnsembleData:
    """Frames along the open -> closed transition (one per entry of ``weights``), their trajectory files, and
    ``n_particles`` particles drawn from the frames with probabilities ``weights`` (``simulate_particles``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    atoms, frames = transition_frames(len(weights), box, apix)
    paths = {s: out / f"trajectory{s}" for s in (".dcd", ".xtc")}
    topology, models_pdb, models_cif = out / "topology.pdb", out / "frames.pdb", out / "frames.cif"
    write_models(topology, atoms, frames[0])
    write_models(models_pdb, atoms, frames)
    write_models(models_cif, atoms, frames)
    for p in paths.values():
        write_trajectory(p, topology, frames)
    centre = box_centre_A(box, apix)
    maps = np.stack([atoms_to_map(f, box, apix, resolution_A, centre_A=centre, weights=atoms.weight) for f in frames])
    conf = Conformations(maps, np.arange(len(frames), dtype=np.float64), apix, "discrete",
                         meta=dict(motion="ensemble", resolution_A=resolution_A))
    sim = simulate_particles(conf, out / "particles", n_particles, snr, populations=weights, seed=seed,
                             write_maps=False)
    counts = np.asarray(sim.meta["counts"], dtype=np.float64)
    return EnsembleData(topology, paths[".dcd"], paths[".xtc"], models_pdb, models_cif, sim, counts / counts.sum(),
                        weights)
