"""The normal-modes file (``modes.npz``, what ``cryohet nma`` writes): read it, check it, pick modes.

Arrays only (``np.load(allow_pickle=False)``): ``eigenvalues`` (M,) ascending, rigid-body modes removed; ``modes``
(M, N, 3), each a unit vector in 3N; ``coords_A`` (N, 3) Å in the map frame (``io.atomic_model``);
``weight`` (N,) electrons per atom; ``collectivity`` (M,); ``chain``, ``resseq``, ``resname``, ``name``,
``element`` (N,); ``cutoff_A``, ``gamma`` (0-d); ``selection`` (0-d). Mode numbers are 1-based (mode 1: the
lowest non-rigid one).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.io.atomic_model import Atoms

ATOM_FIELDS = ("chain", "resseq", "resname", "name", "element")
REQUIRED = ("eigenvalues", "modes", "coords_A", "weight") + ATOM_FIELDS


@dataclass
class NormalModes:
    """Elastic-network modes of ``atoms`` (positions in the map frame): ``eigenvalues`` (M,) ascending (γ/Å²
    units), ``modes`` (M, N, 3) unit vectors in 3N, ``collectivity`` (M,) (Brüschweiler 1995, ProDy's
    ``calcCollectivity``); the network's ``cutoff_A``, ``gamma``, node ``selection`` and the ``solver`` that
    found them (not stored in the file)."""

    eigenvalues: np.ndarray
    modes: np.ndarray
    atoms: Atoms
    collectivity: np.ndarray
    cutoff_A: float = math.nan
    gamma: float = math.nan
    selection: str = ""
    solver: str = ""

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def square_fluctuations(self) -> np.ndarray:
        """Σ_k |v_k,i|² / λ_k per atom (N,), Å² for γ = kT (ProDy's ``calcSqFlucts``)."""
        return ((self.modes ** 2).sum(-1) / self.eigenvalues[:, None]).sum(0)


def read_normal_modes(path: str | os.PathLike) -> NormalModes:
    """Read and check a ``modes.npz``; InputError naming the file when it is missing, unreadable or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "normal-modes file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in REQUIRED if k not in f.files]
            if missing:
                raise InputError(path, f"not a normal-modes file: no {', '.join(missing)}")
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the normal-modes file ({exc})") from None
    modes, xyz = np.asarray(d["modes"], np.float64), np.asarray(d["coords_A"], np.float64)
    n = len(xyz)
    if xyz.shape != (n, 3) or modes.ndim != 3 or modes.shape[1:] != (n, 3) or len(d["eigenvalues"]) != len(modes):
        raise InputError(path, f"inconsistent shapes: modes {modes.shape}, coords_A {xyz.shape}, eigenvalues "
                               f"{np.shape(d['eigenvalues'])}")
    if len(modes) == 0:
        raise InputError(path, "the file holds no modes")
    if any(len(d[k]) != n for k in ("weight",) + ATOM_FIELDS):
        raise InputError(path, f"per-atom arrays do not all have {n} rows")
    if not (np.isfinite(modes).all() and np.isfinite(xyz).all()):
        raise InputError(path, "modes or coordinates hold NaN or infinite values")
    atoms = Atoms(xyz, np.asarray(d["weight"], np.float64), *(np.asarray(d[k]) for k in ATOM_FIELDS), source=path)
    coll = np.asarray(d.get("collectivity", np.full(len(modes), np.nan)), np.float64)
    return NormalModes(np.asarray(d["eigenvalues"], np.float64), modes, atoms, coll,
                       float(d.get("cutoff_A", math.nan)), float(d.get("gamma", math.nan)),
                       str(d.get("selection", "")))


def write_normal_modes(path: str | os.PathLike, nm: NormalModes) -> None:
    """Write ``nm`` as a ``modes.npz`` in the format above (atomic)."""
    a = nm.atoms
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, eigenvalues=np.asarray(nm.eigenvalues, np.float64), modes=np.asarray(nm.modes, np.float64),
                 coords_A=a.xyz_A, weight=a.weight, collectivity=np.asarray(nm.collectivity, np.float64),
                 **{k: np.asarray(getattr(a, k)).astype(np.int64 if k == "resseq" else str) for k in ATOM_FIELDS},
                 cutoff_A=np.float64(nm.cutoff_A), gamma=np.float64(nm.gamma), selection=np.str_(nm.selection))


def parse_mode_list(spec: str, available: int, source: str | os.PathLike) -> list[int]:
    """1-based mode numbers from "1-3", "1,2,5" or "1-3,7"; InputError naming ``source`` (the modes file) for a
    number beyond the ``available`` modes, and ValueError for a malformed list."""
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--modes_used: {spec!r} is not a list such as 1-3 or 1,2,5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise ValueError(f"--modes_used: bad range {part!r} (modes are numbered from 1)")
        out.extend(i for i in range(lo, hi + 1) if i not in out)
    beyond = [i for i in out if i > available]
    if beyond:
        raise InputError(source, f"mode(s) {', '.join(map(str, beyond))} asked for (--modes_used {spec}), but the "
                                 f"file holds {available} modes (1-{available})")
    return out
