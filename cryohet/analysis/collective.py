"""Collective variables of a trajectory's kept frames: frame number, a per-frame value file, RMSD to a frame, or
the distance between the centres of mass of two atom selections (MDAnalysis)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from MDAnalysis.analysis import rms

from cryohet.errors import InputError
from cryohet.io.trajectory import Trajectory


def frame_number(traj: Trajectory) -> np.ndarray:
    """1-based trajectory frame number of each kept frame."""
    return (traj.frames + 1).astype(np.float64)


def cv_from_file(path: str | os.PathLike, traj: Trajectory) -> np.ndarray:
    """Values from a .npy or text file (one number a line): one per kept frame, or one per trajectory frame (the
    kept ones are taken)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "collective-variable file not found")
    try:
        values = np.load(path) if path.suffix.lower() == ".npy" else np.loadtxt(path, ndmin=1)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"cannot read the collective-variable values ({exc})") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n_all = len(traj.universe.trajectory)
    if len(values) == n_all:
        values = values[traj.frames]
    elif len(values) != len(traj):
        raise InputError(path, f"{len(values)} values: expected one per trajectory frame ({n_all}) or one per "
                               f"kept frame ({len(traj)})")
    if not np.isfinite(values).all():
        raise InputError(path, "the collective-variable values include NaN or infinity")
    return values


def rmsd_to_frame(traj: Trajectory, reference: int) -> np.ndarray:
    """RMSD (Å) of the selected atoms of each kept frame to kept frame ``reference`` (1-based), after optimal
    superposition (MDAnalysis ``rms.rmsd``)."""
    if not 1 <= reference <= len(traj):
        raise ValueError(f"--cv_reference_frame must be 1 to {len(traj)} (the kept frames), got {reference}")
    ref = traj.xyz_A[reference - 1].astype(np.float64)
    return np.array([rms.rmsd(x.astype(np.float64), ref, center=True, superposition=True) for x in traj.xyz_A])


def com_distance(traj: Trajectory, selection1: str, selection2: str) -> np.ndarray:
    """Distance (Å) between the centres of mass of two MDAnalysis selections in each kept frame."""
    u = traj.universe
    groups = []
    for sel in (selection1, selection2):
        if not sel:
            raise ValueError("--cv distance needs --cv_selection1 and --cv_selection2 (MDAnalysis selections)")
        try:
            ag = u.select_atoms(sel)
        except Exception as exc:  # MDAnalysis raises several kinds for a bad selection
            raise ValueError(f"bad atom selection {sel!r} ({' '.join(str(exc).split())})") from None
        if len(ag) == 0:
            raise ValueError(f"the selection {sel!r} selects no atoms of {traj.source}")
        groups.append(ag)
    out = []
    for _ in u.trajectory[traj.frames]:
        out.append(float(np.linalg.norm(groups[0].center_of_mass() - groups[1].center_of_mass())))
    return np.array(out)
