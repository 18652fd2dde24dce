"""Rigid bodies for multi-body refinement: masks, centres, the frames their rotations are written in, their order.

A body is a soft mask (values 0-1) on the consensus map's grid. As in RELION (``MlModel::initialiseBodies``) it
rotates about its centre of mass (rounded to whole pixels), and its rotation R relative to the consensus is
written as Euler angles in a frame of its own, ``R = Oᵀ · A90 · E(rot, tilt, psi) · O``: O turns the direction
from the body's centre towards the body it rotates relative to (``rlnBodyRotateRelativeTo``; without one, towards
the box centre) onto −Z, and A90 = E(0, 90, 0)ᵀ, so that no motion reads (0, 90, 0), away from the gimbal lock
at tilt 0. Small tilt and psi changes are then the two bending motions and rot the twist about that direction.

Bodies are given as a RELION bodies STAR (``rlnBodyMaskName``, ``rlnBodyRotateRelativeTo``,
``rlnBodySigmaAngles``, ``rlnBodySigmaOffsetAngst`` or ``rlnBodySigmaOffset`` in pixels) or as a list of mask
files. Masks must match the consensus map's box and pixel size, hold values in [0, 1] and not be empty. Two
bodies whose masks overlap (voxels above 0.5 in both) by more than ``OVERLAP_TOLERANCE`` of the smaller one need
a declared order (``rlnBodyRotateRelativeTo``): the overlap stays with the body being refined.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler
from cryohet.io.mrc import read_map_like
from cryohet.io.star import read_star

#: RELION's rotation3DMatrix(-90, 'Y'): A90 · E(0, 90, 0) = I.
A_ROT90 = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
#: Largest overlap of two bodies' masks (fraction of the smaller one's voxels above 0.5) allowed without an order.
OVERLAP_TOLERANCE = 0.05
#: A mask whose largest value is below this is empty.
EMPTY_MASK = 1e-3


def align_with_z(axis: np.ndarray) -> np.ndarray:
    """The rotation that turns ``axis`` onto +Z (xmipp/RELION ``alignWithZ``, same matrix for the same axis)."""
    a = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(a)
    a = a / norm if norm > 0 else a
    proj = np.hypot(a[1], a[2])
    if proj <= 1e-6:
        return np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return np.array([[proj, -a[0] * a[1] / proj, -a[0] * a[2] / proj],
                     [0.0, a[2] / proj, -a[1] / proj],
                     [a[0], a[1], a[2]]])


def body_frame(centre_A: np.ndarray, towards_A: np.ndarray | None) -> np.ndarray:
    """O for a body at ``centre_A`` rotating relative to the body at ``towards_A`` (None: the box centre)."""
    direction = (np.zeros(3) if towards_A is None else np.asarray(towards_A, np.float64)) - centre_A
    return align_with_z(-direction)


def relative_euler(R: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Euler angles (..., 3) in degrees of rotations R (..., 3, 3) in a body's frame O (no motion: 0, 90, 0)."""
    E = A_ROT90.T @ frame @ np.asarray(R, dtype=np.float64) @ frame.T
    return matrix_to_euler(E)


def relative_rotation(euler_deg: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The rotations R (..., 3, 3) that :func:`relative_euler` writes as ``euler_deg``."""
    return frame.T @ A_ROT90 @ euler_to_matrix(np.asarray(euler_deg, dtype=np.float64)) @ frame


@dataclass
class Body:
    """One rigid body: its mask on the map's grid, centre (Å from the box centre, x y z), frame and priors."""

    mask: np.ndarray                 # (box, box, box) float32 in [0, 1], (z, y, x)
    centre_A: np.ndarray             # (3,) whole pixels times the pixel size
    frame: np.ndarray                # (3, 3) O, see the module's text
    relative_to: int | None          # 0-based body this one rotates relative to
    sigma_angles_deg: float          # width of the Gaussian prior on its rotation
    sigma_offset_A: float            # width of the Gaussian prior on its translation
    source: str                      # the mask file


@dataclass
class BodySet:
    """The bodies of a multi-body refinement, the order they are refined in and their pairwise overlaps."""

    bodies: list[Body]
    box: int
    apix: float
    order: list[int]                 # refinement order: a body after the one it rotates relative to
    overlap: np.ndarray              # (B, B) fraction of the smaller mask's core (> 0.5) inside the other's
    source: Path | None              # the bodies STAR, None for a list of masks

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def masks(self) -> np.ndarray:
        return np.stack([b.mask for b in self.bodies])

    @property
    def centres_A(self) -> np.ndarray:
        return np.stack([b.centre_A for b in self.bodies])

    @property
    def frames(self) -> np.ndarray:
        return np.stack([b.frame for b in self.bodies])


def mask_centre_A(mask: np.ndarray, apix: float) -> np.ndarray:
    """Centre of mass (x, y, z) of a mask in Å from the box centre, rounded to whole pixels (as RELION)."""
    box = mask.shape[-1]
    w = np.asarray(mask, dtype=np.float64)
    zyx = np.array([(w.sum(axis=tuple(a for a in range(3) if a != ax)) * (np.arange(box) - box // 2)).sum()
                    for ax in range(3)]) / w.sum()
    return np.round(zyx[::-1]) * apix


def mask_overlaps(masks: np.ndarray) -> np.ndarray:
    """(B, B): voxels above 0.5 in both masks over the smaller count of voxels above 0.5 (1 on the diagonal)."""
    cores = [np.asarray(m) > 0.5 for m in masks]
    n = len(cores)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            size = max(1, min(cores[i].sum(), cores[j].sum()))
            out[i, j] = out[j, i] = (cores[i] & cores[j]).sum() / size
    return out


def refinement_order(relative_to: list[int | None]) -> list[int]:
    """Bodies in an order where each comes after the body it rotates relative to (ties and cycles: by number)."""
    left = list(range(len(relative_to)))
    order: list[int] = []
    while left:
        ready = [b for b in left if relative_to[b] is None or relative_to[b] in order or relative_to[b] == b]
        pick = ready[0] if ready else left[0]
        order.append(pick)
        left.remove(pick)
    return order


def _read_mask(path: Path, box: int, apix: float, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    mask = read_map_like(path, box, apix, what)
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(path, f"{what} holds values from {lo:.4g} to {hi:.4g}; a body mask must lie in [0, 1]")
    if hi < EMPTY_MASK:
        raise InputError(path, f"{what} is empty (every value is below {EMPTY_MASK:g})")
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


def _star_rows(path: Path, apix: float) -> tuple[list[Path], list[int | None], list[float], list[float], bool]:
    """Mask paths, 0-based relative bodies, prior widths (deg, Å) and whether an order is declared."""
    blocks = read_star(path)
    table = next((t for t in blocks.values() if "rlnBodyMaskName" in t.columns), None)
    if table is None:
        raise InputError(path, "not a bodies STAR file: no rlnBodyMaskName column")
    n = len(table)
    if n < 2:
        raise InputError(path, f"multi-body refinement needs at least two bodies; the file lists {n}")

    def numbers(col: str) -> np.ndarray:
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(v).all():
            raise InputError(path, f"column {col} has a missing or non-numeric value")
        return v

    masks = []
    for name in table["rlnBodyMaskName"].astype(str):
        p = Path(name)
        found = p if p.is_absolute() else next((c for c in (path.parent / p, Path.cwd() / p) if c.is_file()),
                                               path.parent / p)
        masks.append(found)
    declared = "rlnBodyRotateRelativeTo" in table.columns
    rel: list[int | None] = [None] * n
    if declared:
        for i, r in enumerate(numbers("rlnBodyRotateRelativeTo").astype(int)):
            if r > n or r == i + 1 or r == 0:
                raise InputError(path, f"body {i + 1}: rlnBodyRotateRelativeTo {r} is not another body's number "
                                       f"(1..{n}; negative for none)")
            rel[i] = r - 1 if r > 0 else None
    if "rlnBodySigmaAngles" in table.columns:
        sig_ang = numbers("rlnBodySigmaAngles")
    elif {"rlnBodySigmaTilt", "rlnBodySigmaPsi"} <= set(table.columns):
        sig_ang = np.maximum(numbers("rlnBodySigmaTilt"), numbers("rlnBodySigmaPsi"))
    else:
        raise InputError(path, "no prior on the body rotations: give rlnBodySigmaAngles (or rlnBodySigmaTilt and "
                               "rlnBodySigmaPsi)")
    if "rlnBodySigmaOffsetAngst" in table.columns:
        sig_off = numbers("rlnBodySigmaOffsetAngst")
    elif "rlnBodySigmaOffset" in table.columns:
        sig_off = numbers("rlnBodySigmaOffset") * apix
    else:
        raise InputError(path, "no prior on the body offsets: give rlnBodySigmaOffsetAngst (Å) or "
                               "rlnBodySigmaOffset (pixels)")
    if (sig_ang < 0).any() or (sig_off < 0).any():
        raise InputError(path, "the priors' widths (rlnBodySigmaAngles, rlnBodySigmaOffset...) must not be negative")
    return masks, rel, sig_ang.tolist(), sig_off.tolist(), declared and any(r is not None for r in rel)


def read_bodies(spec: str | os.PathLike, box: int, apix: float, sigma_angles_deg: float = 10.0,
                sigma_offset_A: float = 2.0, overlap_tolerance: float = OVERLAP_TOLERANCE) -> BodySet:
    """Bodies from a RELION bodies STAR or a comma-separated list of mask files (with the given prior widths).

    Every mask must be a ``box``³ map at ``apix`` (1 %), in [0, 1] and not empty; overlapping bodies need an
    order. Raises InputError naming the file.
    """
    text = str(spec).strip()
    star = text.lower().endswith(".star") and "," not in text
    if star:
        source: Path | None = Path(os.path.abspath(text))
        if not source.is_file():
            raise InputError(source, "bodies STAR file not found")
        paths, rel, sig_ang, sig_off, declared = _star_rows(source, apix)
    else:
        source = None
        paths = [Path(s.strip()) for s in text.split(",") if s.strip()]
        if len(paths) < 2:
            raise InputError(text or None, "multi-body refinement needs at least two body masks (a bodies STAR "
                                           "or a comma-separated list of mask files)")
        rel, sig_ang, sig_off = [None] * len(paths), [sigma_angles_deg] * len(paths), [sigma_offset_A] * len(paths)
        declared = False
    masks = [_read_mask(p, box, apix, f"body {i + 1} mask") for i, p in enumerate(paths)]
    overlap = mask_overlaps(masks)
    worst = np.triu(overlap, 1)
    i, j = np.unravel_index(np.argmax(worst), worst.shape)
    if worst[i, j] > overlap_tolerance and not (declared and (rel[i] is not None or rel[j] is not None)):
        where = source or paths[j]
        how = ("declare the order with rlnBodyRotateRelativeTo in the bodies STAR" if star else
               "give a bodies STAR file with rlnBodyRotateRelativeTo instead of a list of masks")
        raise InputError(where, f"the masks of bodies {i + 1} ({paths[i].name}) and {j + 1} ({paths[j].name}) "
                                f"overlap: {100 * worst[i, j]:.1f} % of the smaller body's core (voxels above 0.5) "
                                f"is in both, more than {100 * overlap_tolerance:g} %; {how} (the overlap then "
                                "stays with the body being refined), or make the masks meet without overlapping")
    centres = [mask_centre_A(m, apix) for m in masks]
    bodies = [Body(m, c, body_frame(c, centres[r] if r is not None else None), r, float(sa), float(so), str(p))
              for m, c, r, sa, so, p in zip(masks, centres, rel, sig_ang, sig_off, paths)]
    return BodySet(bodies, box, float(apix), refinement_order(rel), overlap, source)
