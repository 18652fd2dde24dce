"""The true displacement field of the simulator's hinge motion, defined at every point of the box.

At τ the moving part of the molecule turns by τ·max_angle_deg about the hinge axis (``motions.Hinge``). A
canonical point x (the τ = 0 conformation) moves with it in proportion to a soft domain mask

    m(x) = sigmoid((distance to the nearest fixed atom − distance to the nearest moving atom) / soft_A),
    d(τ, x) = m(x) · (R(τ·max_angle) (x − p) + p − x),

1 inside the moving part, 0 inside the rest, a smooth blend in between and in the solvent. Positions are Å
(x, y, z) relative to the box centre (the DeformationModel contract of ``models.base``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from cryohet.io.atomic_model import box_centre_A
from cryohet.simulate.atomic_truth import HingeTruth
from cryohet.simulate.motions import rotate_about_axis

#: point sets whose mask is kept
MASKS_KEPT = 64


@dataclass(frozen=True)
class HingeField:
    """Atoms of the canonical conformation (Å from the box centre), which of them move, the hinge's point (Å from
    the box centre) and unit axis, the angle at τ = 1 and the mask's softness ``soft_A`` (Å)."""

    atoms_A: np.ndarray       # (N, 3)
    moving: np.ndarray        # (N,) bool
    point_A: np.ndarray       # (3,)
    axis: np.ndarray          # (3,)
    max_angle_deg: float
    soft_A: float = 3.0

    _masks: dict[bytes, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def mask(self, x_A: np.ndarray) -> np.ndarray:
        """The soft domain mask (P,) in [0, 1] at points ``x_A`` (P, 3) Å (kept for the last few point sets: a
        reconstruction asks for the same voxels with every batch of images)."""
        x = np.ascontiguousarray(x_A, dtype=np.float64)
        key = hashlib.sha1(x.tobytes()).digest()
        if key not in self._masks:
            d_moving = cKDTree(self.atoms_A[self.moving]).query(x)[0]
            d_fixed = cKDTree(self.atoms_A[~self.moving]).query(x)[0]
            if len(self._masks) >= MASKS_KEPT:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = 1.0 / (1.0 + np.exp(-np.clip((d_fixed - d_moving) / self.soft_A, -50, 50)))
        return self._masks[key]

    def rotation(self, tau: float) -> np.ndarray:
        """The moving part's rotation matrix (3, 3) at ``tau`` (x' = R x about the hinge point)."""
        return rotate_about_axis(np.eye(3), np.zeros(3), self.axis, tau * self.max_angle_deg).T

    def displacement(self, tau: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) Å at ``tau`` (B, 1) of canonical points ``x_A`` (P, 3) Å, on ``x_A``'s
        device, float32."""
        x = x_A.detach().cpu().double().numpy()
        rot = np.stack([self.rotation(float(t)) - np.eye(3) for t in tau.detach().cpu().double()[:, 0]])
        m = torch.as_tensor(self.mask(x), dtype=torch.float32, device=x_A.device)
        rel = x_A.detach().float() - torch.as_tensor(self.point_A, dtype=torch.float32, device=x_A.device)
        moved = torch.einsum("pj,bij->bpi", rel, torch.as_tensor(rot, dtype=torch.float32, device=x_A.device))
        return m[None, :, None] * moved


def hinge_field(truth: HingeTruth, soft_A: float = 3.0) -> HingeField:
    """The field of ``atomic_truth.hinge_truth``'s states (τ = 0 the canonical conformation) in its box."""
    centre = box_centre_A(truth.conf.box, truth.conf.apix)
    return HingeField(truth.heavy.xyz_A - centre, truth.hinge.moving, truth.hinge.point_A - centre, truth.hinge.axis,
                      truth.max_angle_deg, soft_A)
