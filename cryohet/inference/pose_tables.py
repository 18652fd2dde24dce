"""Per-particle pose corrections optimised with the model (cryoDRGN's ``--do-pose-sgd``, DRGN-AI's pose tables).

Each particle has a correction (δ, t): a rotation vector δ in degrees (unit axis × angle, image frame) and a
further origin t in Å (rlnOriginX/YAngst, RELION's sign). The corrected pose is A' = ΔR(δ) · A and origin
o' = o + t, ΔR multiplying the RELION matrix on the left as ``pose_search.local_search`` does; the prepared images
have their origins o undone already, so the correction undoes t more (a phase ramp, ``undo_origin``'s sign).

The table and its optimiser state live in buffers, not parameters: O(n) floats (five per particle, fifteen with
Adam's moments, and a step count), saved in the objective's state (checkpoints, resume). Only the rows of a batch
take part in a step: the rows are gathered as a leaf tensor in ``correct``, and ``step`` applies a row-wise Adam
update to them after the model's optimiser step (each row with its own step count, so a row seen once an epoch
gets Adam's bias correction of its own few steps; rows not in the batch do not move, unlike dense Adam).
Corrections stay at zero for the first ``warmup_epochs`` epochs, while the model forms from the consensus poses.
The corrections are bounded (a local refinement): the rotation to ``max_deg`` and the origin change to ``max_A``.

Under DDP the ranks of an epoch train disjoint rows, so each keeps a whole table, updates its own rows, and
``end_epoch`` sums every rank's changes of the epoch (an all-reduce): all ranks then hold the same table.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler
from cryohet.inference.pose_search import rotation_from_vector

#: Adam's moment decays for the rows (each row is updated about once an epoch)
BETAS = (0.8, 0.95)
EPS = 1e-12


class PoseCorrections(nn.Module):
    """Pose corrections of ``n`` particles at ``apix`` Å/pixel (the working lattice's), trained by a row-wise
    Adam with steps ``lr_deg`` (rotation) and ``lr_A`` (origin) after ``warmup_epochs`` epochs."""

    def __init__(self, n: int, apix: float, lr_deg: float = 0.3, lr_A: float = 0.25, warmup_epochs: int = 2,
                 max_deg: float = 10.0, max_A: float = 5.0):
        super().__init__()
        self.apix, self.warmup_epochs = float(apix), int(warmup_epochs)
        # on the table's device (not saved): no host-to-device copy per step
        self.register_buffer("lr", torch.tensor([lr_deg] * 3 + [lr_A] * 2, dtype=torch.float32), persistent=False)
        self.max_deg, self.max_A = float(max_deg), float(max_A)
        self.register_buffer("table", torch.zeros(n, 5))     # δ (deg, 3), t (Å, 2)
        self.register_buffer("exp_avg", torch.zeros(n, 5))
        self.register_buffer("exp_avg_sq", torch.zeros(n, 5))
        self.register_buffer("steps", torch.zeros(n, dtype=torch.int32))
        self.active = False
        self.in_use: bool | None = None  # corrections may be non-zero (set per epoch; None: look at the table)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._start: list[torch.Tensor] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (the learning rates may change)."""
        return {"warmup_epochs": self.warmup_epochs, "max_deg": self.max_deg, "max_A": self.max_A}

    def correct(self, rows: torch.Tensor, rot: torch.Tensor, y: torch.Tensor, kxy: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', y'): the rotations (B, 3, 3) and the data (B, M, 2: real, imaginary at frequencies ``kxy``
        (M, 2) cycles/px) of particles ``rows`` with their corrections; differentiable in them while training."""
        if not (self.training and self.active):
            in_use = self.in_use if self.in_use is not None else bool(self.table.any())  # known without a sync
            if not in_use:
                return rot, y
        delta = self.table[rows.to(self.table.device)].to(rot.device)
        if self.training and self.active:
            delta = delta.clone().requires_grad_(True)
            self._batch = (rows, delta)
        with torch.autocast(rot.device.type, enabled=False):  # float32 poses and phases under mixed precision
            rot = rotation_from_vector(torch.deg2rad(delta[:, :3])) @ rot.float()
            phase = -2 * math.pi * (delta[:, 3:] / self.apix) @ kxy.float().T  # undo_origin's ramp, (B, M)
            c, s = torch.cos(phase), torch.sin(phase)
            yr, yi = y[..., 0].float(), y[..., 1].float()
            return rot, torch.stack([yr * c - yi * s, yr * s + yi * c], -1)

    def begin_epoch(self, epoch: int, distributed: bool = False) -> None:
        """Corrections train from epoch ``warmup_epochs + 1``; ``distributed``: the table's state at the start is
        kept for ``end_epoch``."""
        self.active = self.in_use = epoch > self.warmup_epochs  # corrections change only after the warm-up
        if distributed:
            self._start = [self.table.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone(), self.steps.clone()]

    @torch.no_grad()
    def step(self, grad_scale: float | torch.Tensor = 1.0) -> None:
        """Row-wise Adam on the rows of the last batch (``grad_scale``: the loss scale to divide out, a number or
        a tensor on the device); rows with a non-finite gradient keep their state. No host synchronisation."""
        if self._batch is None:
            return
        rows, delta = self._batch
        self._batch = None
        if delta.grad is None:
            return
        rows = rows.to(self.table.device)
        g = delta.grad.to(self.table.device, torch.float32) / grad_scale
        ok = torch.isfinite(g).all(1)
        g = torch.where(ok[:, None], g, 0.0)
        t = self.steps[rows] + 1
        m = BETAS[0] * self.exp_avg[rows] + (1 - BETAS[0]) * g
        v = BETAS[1] * self.exp_avg_sq[rows] + (1 - BETAS[1]) * g * g
        tf = t.to(torch.float32)[:, None]
        upd = self.lr * (m / (1 - BETAS[0] ** tf)) / ((v / (1 - BETAS[1] ** tf)).sqrt() + EPS)
        new = self.table[rows] - upd
        new[:, :3] *= (self.max_deg / new[:, :3].norm(dim=1).clamp_min(self.max_deg))[:, None]
        new[:, 3:] *= (self.max_A / new[:, 3:].norm(dim=1).clamp_min(self.max_A))[:, None]
        keep = ok[:, None]
        self.table[rows] = torch.where(keep, new, self.table[rows])
        self.exp_avg[rows] = torch.where(keep, m, self.exp_avg[rows])
        self.exp_avg_sq[rows] = torch.where(keep, v, self.exp_avg_sq[rows])
        self.steps[rows] = torch.where(ok, t, self.steps[rows])

    def end_epoch(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Under DDP (``all_reduce`` sums a tensor over the ranks in place): every rank adds the others' changes
        of this epoch, so all hold the same table again."""
        start, self._start = self._start, None
        if all_reduce is None or start is None:
            return
        for buf, s in zip((self.table, self.exp_avg, self.exp_avg_sq, self.steps), start, strict=True):
            change = (buf - s).to(torch.float64)
            all_reduce(change)
            buf.copy_((s.to(torch.float64) + change).to(buf.dtype))

    def refined(self, euler_deg: np.ndarray, shift_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The corrected poses: RELION Euler angles (n, 3) degrees and origins (n, 2) Å of consensus poses
        ``euler_deg``, ``shift_A``."""
        delta = self.table.detach().cpu().double()
        A = torch.as_tensor(euler_to_matrix(np.asarray(euler_deg, dtype=np.float64)))
        A_new = rotation_from_vector(torch.deg2rad(delta[:, :3])) @ A
        return np.asarray(matrix_to_euler(A_new.numpy())), np.asarray(shift_A, dtype=np.float64) + delta[:, 3:].numpy()

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per particle: the rotation's angle (degrees) and the origin's change (Å)."""
        delta = self.table.detach().cpu().double().numpy()
        return np.linalg.norm(delta[:, :3], axis=1), np.linalg.norm(delta[:, 3:], axis=1)


def posed(poses: PoseCorrections | None, d: dict[str, torch.Tensor], kxy: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotations and data of a batch of an objective's inputs (``rot``, ``y``, ``rows``), corrected by
    ``poses`` when they are refined."""
    if poses is None:
        return d["rot"], d["y"]
    return poses.correct(d["rows"], d["rot"], d["y"], kxy)
