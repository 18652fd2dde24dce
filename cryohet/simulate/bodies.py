"""A two-body data set with ground truth: the bundled molecule's LID domain swinging rigidly about its hinge.

Made for multi-body refinement: simulated particles (``simulate_particles`` of ``hinge_conformations``), one soft
mask per rigid body drawn from the atoms of the fixed part (CORE + NMP, body 1) and of the moving LID (body 2), a
RELION bodies STAR naming them, and per particle the true hinge angle and the true rotation of each body relative
to the reference position, which is the LID at the mean hinge angle of the drawn particles (where the consensus
map, an average over the particles, has it). The STAR's poses may carry errors, as a consensus refinement leaves
them; the truth is then relative to those poses.

Masks: the two parts are rendered at low resolution, the voxels above ``support_fraction`` of the maximum are
dilated by ``dilate_px`` and split between the bodies by the nearest atom, and each half gets a raised-cosine
edge ``soft_edge_px`` wide *centred* on its border, so that the two masks sum to about one and do not overlap
above 0.5.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from cryohet.atomic import atomic_path
from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler
from cryohet.io.mrc import write_map
from cryohet.io.star import read_star, write_star
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import atom_coords, atom_weights, centre_of_mass, default_molecule
from cryohet.simulate.motions import default_hinges, hinge_conformations, rotate_about_axis
from cryohet.simulate.simulate import simulate_particles

BODIES_STAR = "bodies.star"
TRUTH_NAME = "body_truth.npz"


@dataclass
class TwoBodyData:
    """What :func:`simulate_two_bodies` wrote and the per-particle truth (rows = STAR rows)."""

    out_dir: Path
    particles_star: Path
    mean_map: Path                   # population-weighted mean of the true maps (a consensus map)
    state_maps: list[Path]           # true map of each hinge state
    mask_paths: list[Path]           # body001_mask.mrc (CORE + NMP), body002_mask.mrc (LID)
    bodies_star: Path                # RELION bodies STAR naming the masks (paths relative to its folder)
    truth: Path                      # body_truth.npz: the arrays below
    hinge_angle_deg: np.ndarray      # (N,) true hinge angle of each particle
    state_angle_deg: np.ndarray      # (K,) hinge angle of each true map
    reference_angle_deg: float       # hinge angle of the reference position (mean over the particles)
    hinge_rotations: np.ndarray      # (N, 3, 3) the LID's rotation about the hinge away from the reference position
    relative_rotations: np.ndarray   # (N, 2, 3, 3) each body's true rotation relative to the STAR's (consensus) pose
    hinge_axis: np.ndarray           # (3,) unit vector (x, y, z), map frame
    hinge_point_A: np.ndarray        # (3,) Å from the box centre (x, y, z)
    true_A: np.ndarray               # (N, 3, 3) the poses the images were made with
    true_origin_A: np.ndarray        # (N, 2)
    consensus_A: np.ndarray          # (N, 3, 3) the poses in the STAR (the true ones with pose_error_deg added)
    consensus_origin_A: np.ndarray   # (N, 2)
    box: int
    apix: float

    def true_shifts_A(self, centres_A: np.ndarray) -> np.ndarray:
        """(N, 2, 2) each body's true in-plane shift Δ = (A_c t)_xy when its rotation is taken about ``centres_A``
        (2, 3) (Å from the box centre): the body's point r, moved to M (r − p) + p about the hinge point p and imaged
        at the true pose, is where A_c (R (r − c) + c + t) − o_c puts it."""
        c = np.asarray(centres_A, dtype=np.float64)
        M = np.stack([np.tile(np.eye(3), (len(self.hinge_rotations), 1, 1)), self.hinge_rotations], 1)
        p = self.hinge_point_A
        moved = np.einsum("nbij,bj->nbi", M, c - p) + p                                   # M (c − p) + p
        at = np.einsum("nij,nbj->nbi", self.true_A, moved) - np.einsum("nij,bj->nbi", self.consensus_A, c)
        return at[..., :2] - self.true_origin_A[:, None] + self.consensus_origin_A[:, None]


def rotation_about_axis(axis: np.ndarray, angle_deg: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) by ``angle_deg`` (right-hand rule) about the unit vector ``axis``."""
    eye = np.eye(3)
    return np.stack([rotate_about_axis(eye, np.zeros(3), axis, a).T for a in np.atleast_1d(angle_deg)]).reshape(
        np.shape(angle_deg) + (3, 3))


def soft_body_masks(parts_xyz: list[np.ndarray], box: int, apix: float, centre_A: np.ndarray,
                    weights: list[np.ndarray], resolution_A: float = 12.0, support_fraction: float = 0.08,
                    dilate_px: int = 2, soft_edge_px: float = 3.0) -> np.ndarray:
    """(P, box, box, box) soft masks, one per atom group, splitting the molecule's dilated envelope by nearest atom."""
    dens = [atoms_to_map(x, box, apix, resolution_A, centre_A=centre_A, weights=w) for x, w in zip(parts_xyz, weights)]
    total = np.sum(dens, axis=0)
    support = ndimage.binary_dilation(total > support_fraction * total.max(), iterations=dilate_px)
    grid = (np.indices((box,) * 3).reshape(3, -1).T[:, ::-1] - box // 2) * apix + centre_A   # voxel (x, y, z), Å
    atoms = np.concatenate(parts_xyz)
    owner = np.concatenate([np.full(len(x), i) for i, x in enumerate(parts_xyz)])
    nearest = owner[cKDTree(atoms).query(grid[support.reshape(-1)])[1]]
    masks = np.zeros((len(parts_xyz), box ** 3), dtype=np.float32)
    for i in range(len(parts_xyz)):
        hard = np.zeros(box ** 3, dtype=bool)
        hard[np.flatnonzero(support.reshape(-1))[nearest == i]] = True
        hard = hard.reshape((box,) * 3)
        # signed distance to the border (negative inside), the cosine edge centred on it
        dist = np.where(hard, 0.5 - ndimage.distance_transform_edt(hard), ndimage.distance_transform_edt(~hard) - 0.5)
        t = np.clip((dist + soft_edge_px / 2) / soft_edge_px, 0, 1)
        masks[i] = (0.5 + 0.5 * np.cos(np.pi * t)).reshape(-1)
    return masks.reshape((len(parts_xyz),) + (box,) * 3)


def write_bodies_star(path: str | os.PathLike, masks: list[str], rotate_relative_to: list[int] | None = None,
                      sigma_angles_deg: float | Sequence[float] = 10.0,
                      sigma_offset_A: float | Sequence[float] = 2.0) -> Path:
    """A RELION 3.1 bodies STAR: one row per mask (``rlnBodyMaskName`` as given), ``rlnBodyRotateRelativeTo``
    (1-based, −1 for none; default: every body relative to the next one, the last to the first), the priors'
    widths (one for all bodies or one per body)."""
    n = len(masks)
    rel = rotate_relative_to or [(i + 1) % n + 1 for i in range(n)]
    table = pd.DataFrame({"rlnBodyMaskName": list(masks), "rlnBodyRotateRelativeTo": np.asarray(rel, dtype=np.int64),
                          "rlnBodySigmaAngles": np.broadcast_to(np.asarray(sigma_angles_deg, np.float64), n),
                          "rlnBodySigmaOffsetAngst": np.broadcast_to(np.asarray(sigma_offset_A, np.float64), n)})
    write_star(path, {"": table})
    return Path(path)


def simulate_two_bodies(out_dir: str | os.PathLike, n_particles: int = 600, box: int = 40, apix: float = 2.5,
                        snr: float | None = 2.0, max_angle_deg: float = 20.0, n_states: int = 21,
                        resolution_A: float = 6.0, sigma_angles_deg: float = 10.0, sigma_offset_A: float = 2.0,
                        seed: int = 0, shift_sigma_A: float = 2.0, pose_error_deg: float = 0.0,
                        shift_error_A: float = 0.0, image_paths: str = "star", device: str = "cpu") -> TwoBodyData:
    """Simulate the LID hinge motion (0 … ``max_angle_deg``, ``n_states`` maps, states drawn uniformly) and write the
    two body masks, ``bodies.star`` and ``body_truth.npz`` beside the particles. Same seed, same data.
    ``image_paths`` (star, cwd or absolute) says how the STARs name the images and the masks: relative to the STAR's
    folder, to the current folder (where RELION runs and looks for them) or absolute.

    ``pose_error_deg`` / ``shift_error_A``: the STAR's poses are the true ones with errors, as a consensus refinement
    leaves them (a rotation vector with this standard deviation per axis, map frame; origins with this standard
    deviation per axis); the true poses are kept in ``cryohetTrue*`` columns and in ``body_truth.npz``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = default_molecule()
    hinge, _ = default_hinges()["LID"]
    conf = hinge_conformations(st, n_states, max_angle_deg, box=box, apix=apix, resolution_A=resolution_A,
                               hinge=hinge, device=device)
    sim = simulate_particles(conf, out, n_particles, snr, seed=seed, device=device, shift_sigma_A=shift_sigma_A,
                             image_paths=image_paths)
    gt = np.load(sim.ground_truth)
    state, true_A, true_origin = gt["state"], euler_to_matrix(gt["euler_deg"]), gt["shift_A"]
    cons_A, cons_origin = _consensus_poses(sim.particles_star, true_A, true_origin, pose_error_deg, shift_error_A,
                                           np.random.default_rng([seed, 0xB0D1]))
    state_angle = np.asarray(conf.meta["angle_deg"], dtype=np.float64)
    angle = state_angle[state]
    ref_angle = float(angle.mean())

    # the maps' common centre (as hinge_conformations places them) and the two parts at the reference angle
    xyz, w = atom_coords(st), atom_weights(st)
    centre = np.mean([centre_of_mass(hinge.apply(xyz, a), w) for a in state_angle], axis=0)
    ref = hinge.apply(xyz, ref_angle)
    moving = hinge.moving
    masks = soft_body_masks([ref[~moving], ref[moving]], box, apix, centre, [w[~moving], w[moving]])
    mask_paths = []
    for i, m in enumerate(masks):
        p = out / f"body{i + 1:03d}_mask.mrc"
        write_map(p, m, apix)
        mask_paths.append(p)
    names = {"star": [p.name for p in mask_paths], "cwd": [os.path.relpath(p, Path.cwd()) for p in mask_paths],
             "absolute": [str(p.resolve()) for p in mask_paths]}[image_paths]
    bodies = write_bodies_star(out / BODIES_STAR, names, [2, 1], sigma_angles_deg, sigma_offset_A)

    M = rotation_about_axis(hinge.axis, angle - ref_angle)
    error = np.swapaxes(cons_A, 1, 2) @ true_A                     # A_cᵀ A
    rel = np.stack([error, error @ M], 1)
    point = hinge.point_A - centre
    truth = out / TRUTH_NAME
    with atomic_path(truth) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, hinge_angle_deg=angle, state_angle_deg=state_angle, reference_angle_deg=ref_angle,
                 hinge_rotations=M, relative_rotations=rel, hinge_axis=hinge.axis, hinge_point_A=point,
                 true_A=true_A, true_origin_A=true_origin, consensus_A=cons_A, consensus_origin_A=cons_origin,
                 box=box, apix=apix)
    return TwoBodyData(out, sim.particles_star, sim.mean_map, sim.map_paths, mask_paths, bodies, truth, angle,
                       state_angle, ref_angle, M, rel, np.asarray(hinge.axis, dtype=np.float64), point, true_A,
                       true_origin, cons_A, cons_origin, box, apix)


def _consensus_poses(star: Path, true_A: np.ndarray, true_origin: np.ndarray, pose_error_deg: float,
                     shift_error_A: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite the STAR's poses as the true ones with errors (the true ones go to cryohetTrue* columns)."""
    n = len(true_A)
    q = Rotation.from_rotvec(np.radians(rng.normal(scale=pose_error_deg, size=(n, 3)))).as_matrix()
    cons_A = true_A @ q
    cons_origin = true_origin + rng.normal(scale=shift_error_A, size=(n, 2))
    if pose_error_deg <= 0 and shift_error_A <= 0:
        return true_A, true_origin
    blocks = read_star(star)
    table = blocks["particles"]
    euler = matrix_to_euler(cons_A)
    for i, name in enumerate(("Rot", "Tilt", "Psi")):
        table[f"cryohetTrueAngle{name}"] = table[f"rlnAngle{name}"]
        table[f"rlnAngle{name}"] = euler[:, i]
    for i, axis in enumerate("XY"):
        table[f"cryohetTrueOrigin{axis}Angst"] = table[f"rlnOrigin{axis}Angst"]
        table[f"rlnOrigin{axis}Angst"] = cons_origin[:, i]
    write_star(star, {"optics": blocks["optics"], "particles": table})
    return cons_A, cons_origin
