"""Pose accuracy against ground truth, up to what an ab initio reconstruction cannot determine.

A map reconstructed without poses is known only up to a rotation G, a translation t and its hand. With RELION
matrices (image = projection of V along Aᵀ), a map rotated by G is seen at A · Gᵀ, so the estimated poses relate to
the true ones by one matrix Q: A_true ≈ A_est · Q; the mirror image of the map (z → −z) is seen at F A F with
F = diag(1, 1, −1); a map moved by t (Å) shifts every origin by the image-plane part of A t. :func:`pose_errors`
fits Q (the chordal mean of A_estᵀ A_true over the particles within ``inlier_deg`` of the current fit, by SVD) and
t (least squares) for both hands and reports the hand that fits better.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIRROR = np.diag([1.0, 1.0, -1.0])


def _nearest_rotation(M: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def _angles_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    cos = (np.einsum("nij,nij->n", A, B) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


@dataclass
class PoseErrors:
    angle_deg: np.ndarray      # (N,) geodesic error per particle after the global alignment
    shift_A: np.ndarray        # (N,) origin error per particle after the global translation
    mirrored: bool             # the estimate has the other hand
    rotation: np.ndarray       # (3, 3) Q: A_true ≈ A_est · Q (on the hand-corrected estimate)
    translation_A: np.ndarray  # (3,) t

    @property
    def median_angle_deg(self) -> float:
        return float(np.median(self.angle_deg))

    @property
    def median_shift_A(self) -> float:
        return float(np.median(self.shift_A))


def _fit_rotation(A_est: np.ndarray, A_true: np.ndarray, inlier_deg: float, rounds: int = 4
                  ) -> tuple[np.ndarray, np.ndarray]:
    M = np.einsum("nji,njk->nik", A_est, A_true)  # A_estᵀ A_true
    Q = _nearest_rotation(M.mean(0))
    for _ in range(rounds):
        err = _angles_deg(A_est @ Q, A_true)
        inl = err <= max(inlier_deg, np.percentile(err, 50))
        Q = _nearest_rotation(M[inl].mean(0))
    return Q, _angles_deg(A_est @ Q, A_true)


def pose_errors(A_est: np.ndarray, shifts_est_A: np.ndarray, A_true: np.ndarray, shifts_true_A: np.ndarray,
                inlier_deg: float = 10.0) -> PoseErrors:
    """Errors of estimated poses (RELION matrices (N, 3, 3), origins (N, 2) Å) against the truth, after the best
    global rotation, translation and hand."""
    A_est = np.asarray(A_est, dtype=np.float64)
    A_true = np.asarray(A_true, dtype=np.float64)
    best = None
    for mirrored in (False, True):
        A = MIRROR @ A_est @ MIRROR if mirrored else A_est
        Q, err = _fit_rotation(A, A_true, inlier_deg)
        if best is None or np.median(err) < np.median(best[2]):
            best = (mirrored, Q, err)
    mirrored, Q, err = best
    # origins (the mirror z → −z leaves them as they are): s_est − s_true = (A_true t)_xy, t by least squares
    d = np.asarray(shifts_est_A, dtype=np.float64) - np.asarray(shifts_true_A, dtype=np.float64)
    G = A_true[:, :2, :].reshape(-1, 3)
    t, *_ = np.linalg.lstsq(G, d.reshape(-1), rcond=None)
    resid = d - (A_true[:, :2, :] @ t)
    return PoseErrors(err, np.linalg.norm(resid, axis=1), bool(mirrored), Q, t)


def map_in_true_frame(volume: np.ndarray, errors: PoseErrors, apix: float) -> np.ndarray:
    """An estimated map (n, n, n), indexed (z, y, x)) resampled into the frame of the truth that ``errors`` was
    fitted against: V_true(w) = V_est(F^m · Q · (w + t)), F^m the mirror when the estimate has the other hand
    (trilinear interpolation, zero outside)."""
    from scipy.ndimage import map_coordinates

    n = volume.shape[-1]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    w = np.stack([x, y, z], -1).reshape(-1, 3) + errors.translation_A / apix
    u = w @ errors.rotation.T
    if errors.mirrored:
        u = u @ MIRROR.T
    coords = (u[:, ::-1] + n // 2).T  # (z, y, x) indices
    return map_coordinates(np.asarray(volume, dtype=np.float64), coords, order=1, cval=0.0).reshape(volume.shape)


def perturb_poses(euler_deg: np.ndarray, shift_A: np.ndarray, angle_deg: float, shift_by_A: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Poses (RELION Euler angles (N, 3) degrees, origins (N, 2) Å) each turned by ``angle_deg`` about a random
    axis (A' = ΔR · A) and moved by ``shift_by_A`` in a random direction: a start for pose refinement tests."""
    import torch

    from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler
    from cryohet.inference.pose_search import rotation_from_vector

    n = len(euler_deg)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    dR = rotation_from_vector(torch.as_tensor(axis * np.radians(angle_deg))).numpy()
    phi = rng.uniform(0, 2 * np.pi, n)
    return (np.asarray(matrix_to_euler(dR @ euler_to_matrix(np.asarray(euler_deg, dtype=np.float64)))),
            np.asarray(shift_A, dtype=np.float64) + shift_by_A * np.stack([np.cos(phi), np.sin(phi)], 1))


def direct_errors(A_est: np.ndarray, shifts_est_A: np.ndarray, A_true: np.ndarray, shifts_true_A: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per particle, the angle (degrees) and origin (Å) errors with no global alignment (poses refined from a
    start in the true frame)."""
    return (_angles_deg(np.asarray(A_est, dtype=np.float64), np.asarray(A_true, dtype=np.float64)),
            np.linalg.norm(np.asarray(shifts_est_A) - np.asarray(shifts_true_A), axis=1))
