"""Per-particle pose corrections (``--refine_poses``): the row-wise Adam step against its formula in numpy, rows
with a non-finite gradient left as they were, and zero corrections leaving rotations and data bit for bit (the
step and the correction decide without reading the device)."""
from __future__ import annotations

import numpy as np
import torch

from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.inference.pose_tables import BETAS, EPS, PoseCorrections

LR = np.array([0.3] * 3 + [0.25] * 2)


def _adam_reference(grads: list[np.ndarray], max_deg: float, max_A: float) -> np.ndarray:
    """The correction of one row after Adam steps with ``grads`` (float64), bounded as the table is."""
    x, m, v = np.zeros(5), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, 1):
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        x = x - LR * (m / (1 - BETAS[0] ** t)) / (np.sqrt(v / (1 - BETAS[1] ** t)) + EPS)
        x[:3] *= max_deg / max(np.linalg.norm(x[:3]), max_deg)
        x[3:] *= max_A / max(np.linalg.norm(x[3:]), max_A)
    return x


def _batch(rows: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rot = torch.as_tensor(euler_to_matrix(random_euler(len(rows), np.random.default_rng(seed))), dtype=torch.float32)
    y = torch.randn(len(rows), 7, 2, generator=g)
    kxy = torch.rand(7, 2, generator=g) - 0.5
    return torch.as_tensor(rows), rot, y, kxy


def test_row_wise_adam_follows_its_formula_and_skips_non_finite_rows() -> None:
    poses = PoseCorrections(6, apix=2.0, warmup_epochs=1, max_deg=0.5, max_A=5.0)
    poses.begin_epoch(2)
    poses.train()
    rows = np.array([1, 3, 4])
    seen: dict[int, list[np.ndarray]] = {1: [], 4: []}
    for step in range(3):
        r, rot, y, kxy = _batch(rows, step)
        rot2, y2 = poses.correct(r, rot, y, kxy)
        weights = torch.linspace(-1, 2, y2.numel()).reshape(y2.shape)
        ((rot2 * torch.arange(9.0).reshape(3, 3)).sum() + (y2 * weights).sum() * (step + 1)).backward()
        _, delta = poses._batch
        delta.grad[1, 2] = float("nan")  # row 3: a non-finite gradient at every step
        for i, row in ((0, 1), (2, 4)):
            seen[row].append(delta.grad[i].double().numpy().copy())
        poses.step()
    table = poses.table.double().numpy()
    for row, grads in seen.items():
        np.testing.assert_allclose(table[row], _adam_reference(grads, 0.5, 5.0), rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(table[1, :3]) - 0.5) < 1e-5  # the bound on the rotation took effect
    assert poses.steps.tolist() == [0, 3, 0, 0, 3, 0]
    for buf in (poses.table, poses.exp_avg, poses.exp_avg_sq):  # row 3 and the rows not in the batch kept
        assert not buf[[0, 2, 3, 5]].any()


def test_zero_corrections_leave_rotations_and_data_bit_for_bit() -> None:
    """During the warm-up nothing is applied; afterwards a zero row's rotation and data are unchanged exactly
    (the identity rotation and a zero phase ramp), so the decision needs no look at the table."""
    poses = PoseCorrections(5, apix=2.0, warmup_epochs=2)
    r, rot, y, kxy = _batch(np.arange(5), 7)
    poses.eval()
    for epoch in (1, 3):  # warm-up (returned as given), then applied (to zero rows)
        poses.begin_epoch(epoch)
        rot2, y2 = poses.correct(r, rot, y, kxy)
        assert torch.equal(rot2, rot) and torch.equal(y2, y)
    fresh = PoseCorrections(5, apix=2.0)  # no epoch begun: the table itself says whether to apply
    fresh.table[2, 0], fresh.table[2, 4] = 3.0, 1.0
    rot2, y2 = fresh.eval().correct(r, rot, y, kxy)
    assert torch.equal(rot2[[0, 1, 3, 4]], rot[[0, 1, 3, 4]]) and not torch.allclose(rot2[2], rot[2])
    # the origin's phase ramp: RELION's sign, t (Å) / apix pixels undone
    phase = -2 * np.pi * (kxy.double() @ torch.tensor([0.0, 0.5], dtype=torch.float64))
    expect = torch.complex(y[2, :, 0].double(), y[2, :, 1].double()) * torch.polar(torch.ones_like(phase), phase)
    np.testing.assert_allclose(y2[2, :, 0].double(), expect.real, atol=1e-5)
    np.testing.assert_allclose(y2[2, :, 1].double(), expect.imag, atol=1e-5)
