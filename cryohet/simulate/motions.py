"""Families of maps V(τ) with known conformation coordinates: hinge, two-part, interpolation, discrete, MRC series.

Every builder returns a ``Conformations``: K maps on a common grid and centre (so that a part that does not
move stays put in every map) and their coordinates ``tau`` (K, d). Continuous motions use τ in [0, 1]
(fraction of the maximum angle, or of the way from model A to model B); discrete sets use the state index.
"""
from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gemmi
import numpy as np

from cryohet.errors import InputError
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import (
    DEFAULT_DOMAINS,
    atom_coords,
    atom_keys,
    atom_weights,
    centre_of_mass,
    default_molecule,
    is_default_molecule,
    kabsch,
    select_residues,
)


@dataclass
class Conformations:
    """A family of maps V(τ) sampled at K points."""

    maps: np.ndarray          # (K, box, box, box) float32, RELION orientation (z, y, x)
    tau: np.ndarray           # (K, d) float64 conformation coordinate of each map
    apix: float
    kind: str                 # "continuous" or "discrete"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.tau = np.asarray(self.tau, dtype=np.float64)
        if self.tau.ndim == 1:
            self.tau = self.tau[:, None]
        if self.maps.ndim != 4 or self.maps.shape[1:] != (self.maps.shape[1],) * 3:
            raise ValueError(f"maps must be (K, box, box, box), got {self.maps.shape}")
        if len(self.tau) != len(self.maps):
            raise ValueError(f"{len(self.tau)} tau rows for {len(self.maps)} maps")
        if self.kind not in ("continuous", "discrete"):
            raise ValueError(f"kind must be 'continuous' or 'discrete', got {self.kind!r}")

    @property
    def n_states(self) -> int:
        return len(self.maps)

    @property
    def box(self) -> int:
        return self.maps.shape[-1]

    @property
    def dim(self) -> int:
        return self.tau.shape[1]


# ---------------------------------------------------------------------------------------------- hinges
@dataclass(frozen=True)
class Hinge:
    """A rigid part (atom mask) rotating about the axis through ``point_A`` along unit vector ``axis``."""

    moving: np.ndarray        # (N,) bool
    point_A: np.ndarray       # (3,) x, y, z in Å
    axis: np.ndarray          # (3,) unit vector

    def apply(self, xyz: np.ndarray, angle_deg: float) -> np.ndarray:
        """Positions (N, 3) with the moving atoms rotated by ``angle_deg`` (right-hand rule about ``axis``)."""
        out = np.array(xyz, dtype=np.float64, copy=True)
        out[self.moving] = rotate_about_axis(out[self.moving], self.point_A, self.axis, angle_deg)
        return out


def rotate_about_axis(xyz: np.ndarray, point_A: np.ndarray, axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate positions (N, 3) by ``angle_deg`` about the line through ``point_A`` along ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * (kx @ kx)
    return (np.asarray(xyz) - point_A) @ rot.T + point_A


def fit_hinge(xyz_a: np.ndarray, xyz_b: np.ndarray, moving: np.ndarray, fixed: np.ndarray | None = None
              ) -> tuple[Hinge, float]:
    """The hinge that best carries the moving part from model A to model B, and its angle in degrees.

    B is first superposed on A by the ``fixed`` atoms (default: all the others); the rigid motion of the moving
    part is then written as a rotation about a screw axis (the small translation along the axis is dropped).
    """
    moving = np.asarray(moving, dtype=bool)
    fixed = ~moving if fixed is None else np.asarray(fixed, dtype=bool)
    r, t = kabsch(xyz_b[fixed], xyz_a[fixed])
    b = xyz_b @ r.T + t
    r2, t2 = kabsch(xyz_a[moving], b[moving])
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r2) - 1) / 2, -1.0, 1.0))))
    axis = np.array([r2[2, 1] - r2[1, 2], r2[0, 2] - r2[2, 0], r2[1, 0] - r2[0, 1]])
    if np.linalg.norm(axis) < 1e-9:          # no rotation: any axis, zero angle
        return Hinge(moving, centre_of_mass(xyz_a[moving]), np.array([0.0, 0.0, 1.0])), 0.0
    axis /= np.linalg.norm(axis)
    perp = t2 - (t2 @ axis) * axis
    point = np.linalg.lstsq(np.eye(3) - r2, perp, rcond=None)[0]
    return Hinge(moving, point, axis), angle


def auto_hinge(xyz: np.ndarray, moving: np.ndarray | None = None, end: int = 1, fraction: float = 0.3) -> Hinge:
    """A plausible hinge for any model.

    Without ``moving``, the moving part is the ``fraction`` of atoms furthest along the longest principal
    axis (``end=1``) or against it (``end=-1``). The hinge point is the centre of the moving atoms within 6 Å
    of the rest (the interface); the axis is perpendicular to the line from it to the moving part's centre and
    to the model's shortest principal axis, so the part swings within the model's broad plane.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    c = xyz.mean(0)
    _, vecs = np.linalg.eigh(np.cov((xyz - c).T))       # ascending variance
    if moving is None:
        proj = end * (xyz - c) @ vecs[:, 2]
        moving = proj >= np.quantile(proj, 1 - fraction)
    moving = np.asarray(moving, dtype=bool)
    if moving.all() or not moving.any():
        raise ValueError("the moving part must be a proper, non-empty subset of the atoms")
    mov, rest = xyz[moving], xyz[~moving]
    from scipy.spatial import cKDTree

    near = cKDTree(rest).query(mov, distance_upper_bound=6.0)[0] < np.inf
    point = mov[near].mean(0) if near.any() else mov[np.argmin(cKDTree(rest).query(mov)[0])]
    d = mov.mean(0) - point
    axis = np.cross(d, vecs[:, 0])
    if np.linalg.norm(axis) < 1e-6 * max(np.linalg.norm(d), 1.0):
        axis = vecs[:, 1]
    return Hinge(moving, point, axis / np.linalg.norm(axis))


def default_hinges() -> dict[str, tuple[Hinge, float]]:
    """The bundled molecule's LID and NMP hinges, fitted to its open -> closed change, with their closing angles."""
    xo = atom_coords(default_molecule())
    xc = atom_coords(default_molecule(closed=True))
    st = default_molecule()
    core = select_residues(st, DEFAULT_DOMAINS["CORE"])
    return {name: fit_hinge(xo, xc, select_residues(st, DEFAULT_DOMAINS[name]), core) for name in ("LID", "NMP")}


def _resolve_hinge(structure: gemmi.Structure, hinge: Hinge | str | None, default_domain: str, end: int) -> Hinge:
    xyz = atom_coords(structure)
    if isinstance(hinge, Hinge):
        if len(hinge.moving) != len(xyz):
            raise ValueError(f"hinge mask has {len(hinge.moving)} atoms, the model {len(xyz)}")
        return hinge
    if hinge is None and is_default_molecule(structure):
        return default_hinges()[default_domain][0]
    moving = select_residues(structure, hinge) if isinstance(hinge, str) and hinge.strip() else None
    return auto_hinge(xyz, moving, end=end)


def _maps_of_models(models: Sequence[np.ndarray], weights: np.ndarray, box: int, apix: float, resolution_A: float,
                    device: str) -> np.ndarray:
    """Maps of several coordinate sets of the same atoms on one common centre (the mean of their centres).

    Atoms that sit still in every model are rendered once (maps are linear in the atoms).
    """
    centre = np.mean([centre_of_mass(x, weights) for x in models], axis=0)
    still = np.all([(x == models[0]).all(axis=1) for x in models[1:]], axis=0) if len(models) > 1 else None
    if still is None or not still.any() or still.all():
        return np.stack([atoms_to_map(x, box, apix, resolution_A, centre_A=centre, weights=weights, device=device)
                         for x in models])
    base = atoms_to_map(models[0][still], box, apix, resolution_A, centre_A=centre, weights=weights[still],
                        device=device)
    return np.stack([base + atoms_to_map(x[~still], box, apix, resolution_A, centre_A=centre,
                                         weights=weights[~still], device=device) for x in models])


def hinge_conformations(structure: gemmi.Structure, n_states: int = 20, max_angle_deg: float = 50.0,
                        box: int = 64, apix: float = 2.0, resolution_A: float = 6.0,
                        hinge: Hinge | str | None = None, device: str = "cpu") -> Conformations:
    """A part rotating about a hinge by τ·max_angle_deg, τ = 0 … 1 on ``n_states`` evenly spaced points.

    ``hinge``: a Hinge, a residue selection (``"A:122-159"``, axis found by ``auto_hinge``), or None: the LID
    domain of the bundled molecule (closing towards its closed state), else ``auto_hinge``.
    """
    if n_states < 1:
        raise ValueError("n_states must be at least 1")
    h = _resolve_hinge(structure, hinge, "LID", end=1)
    xyz, w = atom_coords(structure), atom_weights(structure)
    tau = np.linspace(0.0, 1.0, n_states) if n_states > 1 else np.zeros(1)
    models = [h.apply(xyz, t * max_angle_deg) for t in tau]
    maps = _maps_of_models(models, w, box, apix, resolution_A, device)
    return Conformations(maps, tau[:, None], apix, "continuous",
                         meta=dict(motion="hinge", angle_deg=(tau * max_angle_deg).tolist(), moving_atoms=int(
                             h.moving.sum()), hinge_point_A=h.point_A.tolist(), hinge_axis=h.axis.tolist(),
                             resolution_A=resolution_A))


def two_part_conformations(structure: gemmi.Structure, n_per_axis: int = 5,
                           max_angle_deg: float | tuple[float, float] = (50.0, 45.0), box: int = 64,
                           apix: float = 2.0, resolution_A: float = 6.0,
                           hinges: tuple[Hinge | str | None, Hinge | str | None] = (None, None),
                           device: str = "cpu") -> Conformations:
    """Two parts moving independently (a 2-D motion): τ = (τ1, τ2) on an n_per_axis × n_per_axis grid in [0, 1]².

    Defaults: the bundled molecule's LID (τ1) and NMP (τ2) domains; other models: the two ends of the longest
    principal axis (``auto_hinge``). The two moving parts must not overlap.
    """
    if n_per_axis < 2:
        raise ValueError("n_per_axis must be at least 2")
    angles = (max_angle_deg, max_angle_deg) if np.isscalar(max_angle_deg) else tuple(max_angle_deg)
    h1 = _resolve_hinge(structure, hinges[0], "LID", end=1)
    h2 = _resolve_hinge(structure, hinges[1], "NMP", end=-1)
    if (h1.moving & h2.moving).any():
        raise ValueError("the two moving parts overlap")
    xyz, w = atom_coords(structure), atom_weights(structure)
    grid = np.linspace(0.0, 1.0, n_per_axis)
    tau = np.array(list(itertools.product(grid, grid)))
    models = [h2.apply(h1.apply(xyz, t1 * angles[0]), t2 * angles[1]) for t1, t2 in tau]
    maps = _maps_of_models(models, w, box, apix, resolution_A, device)
    return Conformations(maps, tau, apix, "continuous",
                         meta=dict(motion="two_part", max_angle_deg=list(angles), resolution_A=resolution_A))


def match_atoms(struct_a: gemmi.Structure, struct_b: gemmi.Structure) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the atoms the two models share (same chain, residue, name); raise ValueError if few."""
    ka, kb = atom_keys(struct_a), atom_keys(struct_b)
    where_b = {k: i for i, k in enumerate(kb)}
    pairs = [(i, where_b[k]) for i, k in enumerate(ka) if k in where_b]
    if len(pairs) < max(3, 0.5 * min(len(ka), len(kb))):
        raise ValueError(f"the two models share only {len(pairs)} of {len(ka)}/{len(kb)} atoms "
                         "(matched by chain, residue number and atom name)")
    ia, ib = (np.array(x) for x in zip(*pairs))
    return ia, ib


def superpose_stable(xyz_a: np.ndarray, xyz_b: np.ndarray, n_iter: int = 5) -> np.ndarray:
    """B (N, 3) superposed on A (same atoms) by the atoms that move least (iterated fit on the closer half)."""
    use = np.ones(len(xyz_a), dtype=bool)
    b = xyz_b
    for _ in range(n_iter):
        r, t = kabsch(xyz_b[use], xyz_a[use])
        b = xyz_b @ r.T + t
        dev = np.linalg.norm(b - xyz_a, axis=1)
        use = dev <= np.median(dev)
    return b


def interpolation_conformations(struct_a: gemmi.Structure, struct_b: gemmi.Structure, n_states: int = 20,
                                box: int = 64, apix: float = 2.0, resolution_A: float = 6.0, superpose: bool = True,
                                device: str = "cpu") -> Conformations:
    """Linear interpolation of the shared atoms from model A (τ = 0) to model B (τ = 1).

    With ``superpose``, B is first fitted on A by the atoms that move least, so the motion is not a drift.
    """
    if n_states < 1:
        raise ValueError("n_states must be at least 1")
    ia, ib = match_atoms(struct_a, struct_b)
    xa, xb = atom_coords(struct_a)[ia], atom_coords(struct_b)[ib]
    w = atom_weights(struct_a)[ia]
    if superpose:
        xb = superpose_stable(xa, xb)
    tau = np.linspace(0.0, 1.0, n_states) if n_states > 1 else np.zeros(1)
    models = [(1 - t) * xa + t * xb for t in tau]
    maps = _maps_of_models(models, w, box, apix, resolution_A, device)
    return Conformations(maps, tau[:, None], apix, "continuous",
                         meta=dict(motion="interpolate", shared_atoms=len(ia), resolution_A=resolution_A))


def discrete_conformations(maps_or_structures: Sequence[np.ndarray | gemmi.Structure] | np.ndarray,
                           apix: float | None = None, box: int = 64, resolution_A: float = 6.0,
                           common_centre: bool = True, device: str = "cpu") -> Conformations:
    """Discrete states (τ = state index 0 … K-1) from maps (each (box, box, box), needs ``apix``) or models.

    Models are rendered on one common centre (``common_centre``) or each on its own centre of mass.
    """
    items = list(maps_or_structures)
    if not items:
        raise ValueError("no states given")
    if all(isinstance(s, gemmi.Structure) for s in items):
        apix = 2.0 if apix is None else apix
        coords = [atom_coords(s) for s in items]
        weights = [atom_weights(s) for s in items]
        centre = np.mean([centre_of_mass(x, w) for x, w in zip(coords, weights)], axis=0) if common_centre else None
        maps = np.stack([atoms_to_map(x, box, apix, resolution_A, centre_A=centre, weights=w, device=device)
                         for x, w in zip(coords, weights)])
    else:
        if apix is None:
            raise ValueError("apix is required for maps")
        maps = np.stack([np.asarray(m, dtype=np.float32) for m in items])
    tau = np.arange(len(maps), dtype=np.float64)[:, None]
    return Conformations(maps, tau, float(apix), "discrete", meta=dict(motion="discrete"))


def expand_map_paths(spec: str | Sequence[str | os.PathLike]) -> list[Path]:
    """Map files from a glob pattern or comma-separated list (or a list of either), globs sorted by name."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    paths: list[Path] = []
    for item in filter(None, items):
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise InputError(item, "no file matches this pattern")
            paths += [Path(p) for p in found]
        else:
            paths.append(Path(item))
    if not paths:
        raise InputError(None, "no maps given")
    return paths


def maps_conformations(map_paths: str | Sequence[str | os.PathLike], discrete: bool = False,
                       tau: np.ndarray | None = None) -> Conformations:
    """A series of MRC maps (same box and pixel size), in the given order.

    Continuous by default: τ evenly spaced in [0, 1] (or ``tau`` (K,) / (K, d)); ``discrete``: τ = map index.
    """
    from cryohet.io.mrc import read_map

    paths = expand_map_paths(map_paths)
    maps, apix0 = [], None
    for p in paths:
        if not p.is_file():
            raise InputError(p, "map not found")
        arr, apix = read_map(p)
        if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2:
            raise InputError(p, f"expected a cubic map with an even box, got shape {arr.shape}")
        if maps and arr.shape != maps[0].shape:
            raise InputError(p, f"box {arr.shape} differs from {paths[0]} {maps[0].shape}")
        if apix0 is not None and abs(apix - apix0) > 1e-3 * apix0:
            raise InputError(p, f"pixel size {apix:.4f} Å differs from {paths[0]} ({apix0:.4f} Å)")
        apix0 = apix if apix0 is None else apix0
        maps.append(arr)
    if discrete:
        t = np.arange(len(maps), dtype=np.float64)
    elif tau is not None:
        t = np.asarray(tau, dtype=np.float64)
    else:
        t = np.linspace(0.0, 1.0, len(maps)) if len(maps) > 1 else np.zeros(1)
    return Conformations(np.stack(maps), t, float(apix0), "discrete" if discrete else "continuous",
                         meta=dict(motion="maps", sources=[str(p) for p in paths]))
