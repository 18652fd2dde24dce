"""RELION's Euler angles (rot, tilt, psi; ZYZ, degrees) and rotation matrices (euler.cpp)."""
from __future__ import annotations

import numpy as np
import torch


def euler_to_matrix(euler_deg: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """RELION's ``Euler_angles2matrix``: (..., 3) degrees -> (..., 3, 3) matrices A.

    A projection is P(x, y) = ∫ V(Aᵀ (x, y, z)) dz. Returns the same array type it is given.
    """
    as_numpy = not isinstance(euler_deg, torch.Tensor)
    e = torch.from_numpy(np.array(euler_deg, dtype=np.float64)) if as_numpy else euler_deg
    rad = torch.deg2rad(e)
    ca, cb, cg = torch.cos(rad[..., 0]), torch.cos(rad[..., 1]), torch.cos(rad[..., 2])
    sa, sb, sg = torch.sin(rad[..., 0]), torch.sin(rad[..., 1]), torch.sin(rad[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    A = torch.stack(rows, -2)
    return A.numpy() if as_numpy else A


def matrix_to_euler(A: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """RELION's ``Euler_matrix2angles`` with tilt in [0, 180]: (..., 3, 3) -> (..., 3) degrees."""
    as_numpy = not isinstance(A, torch.Tensor)
    M = torch.from_numpy(np.array(A, dtype=np.float64)) if as_numpy else A
    abs_sb = torch.sqrt(M[..., 0, 2] ** 2 + M[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    psi = torch.where(regular, torch.atan2(M[..., 1, 2], -M[..., 0, 2]),
                      torch.where(M[..., 2, 2] > 0, torch.atan2(-M[..., 1, 0], M[..., 0, 0]),
                                  torch.atan2(M[..., 1, 0], -M[..., 0, 0])))
    rot = torch.where(regular, torch.atan2(M[..., 2, 1], M[..., 2, 0]), torch.zeros_like(abs_sb))
    tilt = torch.where(regular, torch.atan2(abs_sb, M[..., 2, 2]),
                       torch.where(M[..., 2, 2] > 0, torch.zeros_like(abs_sb), torch.full_like(abs_sb, np.pi)))
    out = torch.rad2deg(torch.stack([rot, tilt, psi], -1))
    return out.numpy() if as_numpy else out


def random_euler(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations drawn uniformly on SO(3), as RELION Euler angles (n, 3) in degrees."""
    from scipy.spatial.transform import Rotation  # scipy.spatial: 0.2 s of every command's start otherwise

    return matrix_to_euler(Rotation.random(n, random_state=rng).as_matrix())
