"""Frames of a trajectory: DCD/XTC (and any other MDAnalysis format) with a topology, or multi-model PDB/mmCIF.

Coordinates stay in the file's frame, which must be the frame of the particles' map (map origin 0, voxel i at
i·apix Å, see ``cryohet.io.atomic_model``): the frames are fitted to the consensus map beforehand (e.g. the
trajectory aligned on a model fitted in ChimeraX). Atoms are chosen with an MDAnalysis selection string, or
``heavy`` (every atom but hydrogens and waters); each is rendered with its atomic number as weight.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import gemmi
import MDAnalysis as mda
import numpy as np
from MDAnalysis.coordinates.memory import MemoryReader

from cryohet.errors import InputError
from cryohet.io.atomic_model import CIF_SUFFIXES, Atoms, check_in_box

#: The default selection: every atom but hydrogens and waters.
HEAVY = "heavy"
WATERS = "resname HOH WAT SOL TIP3 TIP4 SPC"
#: Formats that carry their own topology (a multi-model file is a whole trajectory by itself).
MODEL_SUFFIXES = (".pdb", ".ent") + CIF_SUFFIXES


@dataclass
class Trajectory:
    """Selected atoms of a trajectory's frames (the frames kept after ``stride``)."""

    universe: mda.Universe   # the whole system, the trajectory in memory or on disk
    atoms: mda.AtomGroup     # the selected atoms
    frames: np.ndarray       # (F,) int, indices of the kept frames in the trajectory (0-based)
    xyz_A: np.ndarray        # (F, N, 3) float32 Å, the selected atoms in each kept frame, (x, y, z)
    weight: np.ndarray       # (N,) float64 electrons rendered per atom (atomic number)
    source: Path

    def __len__(self) -> int:
        return len(self.frames)

    def as_atoms(self, frame: int) -> Atoms:
        """Frame ``frame`` (index into the kept frames) as ``Atoms`` (for ``cryohet.io.atomic_model``)."""
        ag = self.atoms
        return Atoms(xyz_A=self.xyz_A[frame].astype(np.float64), weight=self.weight,
                     chain=np.asarray(_chains(ag), dtype=str), resseq=np.asarray(ag.resids, dtype=np.int64),
                     resname=np.asarray(ag.resnames, dtype=str), name=np.asarray(ag.names, dtype=str),
                     element=np.asarray(_elements(ag), dtype=str), source=self.source)


def _chains(ag: mda.AtomGroup) -> np.ndarray:
    if hasattr(ag, "chainIDs"):
        return ag.chainIDs
    return ag.segids if hasattr(ag, "segids") else np.full(len(ag), "A")


def _elements(ag: mda.AtomGroup) -> np.ndarray:
    """Element symbols of ``ag``: the topology's, or guessed from the atom names where it has none."""
    u = ag.universe
    if not hasattr(u.atoms, "elements") or not all(u.atoms.elements):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u.guess_TopologyAttrs(to_guess=["elements"], force_guess=["elements"])
    return ag.elements


def _open(path: Path, what: str) -> None:
    if not path.is_file():
        raise InputError(path, f"{what} not found")


def _universe(trajectory: Path, topology: Path | None) -> mda.Universe:
    """The MDAnalysis universe of ``trajectory`` (with ``topology``)."""
    if topology is None and trajectory.suffix.lower() not in MODEL_SUFFIXES:
        raise InputError(trajectory, "a trajectory in this format has no atom names: give its topology "
                                     "(--topology, e.g. the PDB or GRO file it was written from)")
    top = topology if topology is not None else trajectory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if top.suffix.lower() in CIF_SUFFIXES:
            u = _cif_universe(top)
        else:
            try:
                u = mda.Universe(str(top))
            except Exception as exc:  # MDAnalysis raises many kinds for unreadable files
                raise InputError(top, f"cannot read the topology ({_one_line(exc)})") from None
        if top == trajectory:
            return u
        if trajectory.suffix.lower() in CIF_SUFFIXES:
            coords = _cif_frames(gemmi_structure(trajectory), trajectory)
            if coords.shape[1] != len(u.atoms):
                raise _mismatch(trajectory, top, len(u.atoms), f"{coords.shape[1]} atoms per frame")
            u.load_new(coords, format=MemoryReader)
            return u
        try:
            u.load_new(str(trajectory))
        except ValueError as exc:
            if "number of atoms" in str(exc):
                raise _mismatch(trajectory, top, len(u.atoms), _one_line(exc)) from None
            raise InputError(trajectory, f"cannot read the trajectory ({_one_line(exc)})") from None
        except Exception as exc:
            raise InputError(trajectory, f"cannot read the trajectory ({_one_line(exc)})") from None
    return u


def _mismatch(trajectory: Path, topology: Path, n_top: int, detail: str) -> InputError:
    return InputError(trajectory, f"the trajectory does not match the topology {topology} ({n_top} atoms): "
                                  f"{detail}; give the topology the trajectory was written with")


def gemmi_structure(path: Path) -> gemmi.Structure:
    """Every model of a PDB/mmCIF file (gemmi); InputError naming the file when it cannot be read."""
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(path, f"cannot read the models ({exc})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(path, "the file has no atoms")
    return st


def _cif_frames(st: gemmi.Structure, path: Path) -> np.ndarray:
    """Coordinates (F, N, 3) of every model, atoms in file order."""
    counts = {m.count_atom_sites() for m in st}
    if len(counts) != 1:
        raise InputError(path, f"the models have different numbers of atoms ({sorted(counts)}): not a trajectory")
    return np.stack([np.array([a.pos.tolist() for ch in m for r in ch for a in r], dtype=np.float32)
                     for m in st])


def _cif_universe(path: Path) -> mda.Universe:
    """A universe of a (multi-model) mmCIF file built from gemmi: MDAnalysis reads only an mmCIF's first model,
    and its reader depends on the gemmi version."""
    st = gemmi_structure(path)
    coords = _cif_frames(st, path)
    atoms = [(ch.name, r.seqid.num, r.seqid.icode, r.name, a.name, a.element.name)
             for ch in st[0] for r in ch for a in r]
    keys = [a[:4] for a in atoms]
    new_residue = np.array([i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))])
    starts = np.flatnonzero(new_residue)
    resindex = np.cumsum(new_residue) - 1
    u = mda.Universe.empty(len(atoms), n_residues=len(starts), atom_resindex=resindex, trajectory=True)
    u.add_TopologyAttr("names", [a[4] for a in atoms])
    u.add_TopologyAttr("elements", [a[5] for a in atoms])
    u.add_TopologyAttr("chainIDs", [a[0] for a in atoms])
    u.add_TopologyAttr("resids", [atoms[i][1] for i in starts])
    u.add_TopologyAttr("resnames", [atoms[i][3] for i in starts])
    u.load_new(coords, format=MemoryReader)
    return u


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _select(u: mda.Universe, selection: str, source: Path) -> mda.AtomGroup:
    if selection == HEAVY:
        ag = u.select_atoms(f"not ({WATERS})")
        ag = ag[np.char.upper(np.asarray(_elements(ag), dtype=str)) != "H"]
    else:
        try:
            ag = u.select_atoms(selection)
        except Exception as exc:
            raise InputError(source, f"bad atom selection {selection!r} ({_one_line(exc)})") from None
    if len(ag) == 0:
        raise InputError(source, f"the selection {selection!r} selects no atoms")
    return ag


def read_trajectory(trajectory: str | os.PathLike, topology: str | os.PathLike | None = None,
                    selection: str = HEAVY, stride: int = 1) -> Trajectory:
    """The selected atoms in every ``stride``-th frame of ``trajectory``.

    ``trajectory``: DCD, XTC, TRR, NetCDF... (with ``topology``) or a multi-model PDB/mmCIF (its own topology,
    or with ``topology`` to name the atoms). InputError naming the file: missing or unreadable files, a
    topology whose atom count differs from the trajectory's, a selection that selects nothing, fewer than two
    frames (nothing to weigh).
    """
    trajectory = Path(trajectory)
    topology = Path(topology) if topology is not None else None
    _open(trajectory, "trajectory")
    if topology is not None:
        _open(topology, "topology")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    u = _universe(trajectory, topology)
    ag = _select(u, selection, topology or trajectory)
    frames = np.arange(0, len(u.trajectory), stride)
    if len(frames) < 2:
        raise InputError(trajectory, f"{len(u.trajectory)} frame(s) (every {stride}th kept: {len(frames)}): "
                                     "reweighting needs at least two frames")
    xyz = np.empty((len(frames), len(ag), 3), dtype=np.float32)
    for i, _ in enumerate(u.trajectory[::stride]):
        xyz[i] = ag.positions
    weight = np.array([max(gemmi.Element(str(e)).atomic_number, 1) for e in _elements(ag)], dtype=np.float64)
    return Trajectory(u, ag, frames, xyz, weight, trajectory)


def check_frames_in_box(traj: Trajectory, box: int, apix: float) -> None:
    """InputError naming the trajectory when the atoms of any frame lie outside the particles' box."""
    for f in range(len(traj)):
        try:
            check_in_box(traj.as_atoms(f), box, apix)
        except InputError as exc:
            raise InputError(traj.source, f"frame {traj.frames[f] + 1}: {exc.problem}") from None
