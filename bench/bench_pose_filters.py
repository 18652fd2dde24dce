"""Cost of the pose-aware encoder's first layer (``train-vae --encoder_filters``) per training step, forward and
backward, against the pixel encoder's first layer it replaces, and against interpolating every filter at every
pixel (``grid_sample`` of the K filters at ±k, the direct way, which the first version did).

    .venv/bin/python bench/bench_pose_filters.py            # 1 thread, batch 16, K = 32, 20 Å
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import plane_coords
from cryohet.inference.pose_filters import PoseFilterBank


def direct_responses(bank: PoseFilterBank, rot: torch.Tensor, ctf: torch.Tensor, signal: torch.Tensor,
                     grid: torch.Tensor) -> torch.Tensor:
    """The same responses by trilinear interpolation of the full (1, 2K, G, G, G) filter grid at ±k."""
    g, k = bank.grid, bank.n_filters
    pos = plane_coords(bank.kpx, rot, 1)

    def sample(p: torch.Tensor) -> torch.Tensor:
        x = (p.reshape(1, -1, 1, 1, 3) + g // 2) / (g - 1) * 2 - 1
        return F.grid_sample(grid, x, mode="bilinear", align_corners=True).reshape(k, 2, *p.shape[:-1])

    a, b = sample(pos), sample(-pos)
    re, im = 0.5 * (a[:, 0] + b[:, 0]), 0.5 * (a[:, 1] - b[:, 1])
    r, c = signal[:, bank.sel], ctf[:, bank.sel] * bank.w
    return ((re * r[None, ..., 0] + im * r[None, ..., 1]) * c[None]).sum(-1).T


def per_step_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    for _ in range(3):
        fn().sum().backward()
    t = time.perf_counter()
    for _ in range(reps):
        fn().sum().backward()
    return (time.perf_counter() - t) / reps * 1e3


def row(box: int, apix: float, a: argparse.Namespace) -> str:
    """One table row: the three first layers' milliseconds per step at ``box`` and ``apix``."""
    pts = Lattice(box, apix).half_plane()
    bank = PoseFilterBank(a.filters, box, pts.kxy, pts.weight, apix / a.res_A, torch.Generator().manual_seed(0))
    g, nv = bank.grid, bank.n_voxels
    full = torch.zeros(a.filters, 2, g ** 3)
    near = bank.compact >= 0
    full[:, 0, near], full[:, 1, near] = bank.values.detach()[:nv].T, bank.values.detach()[nv:].T
    grid = full.reshape(1, 2 * a.filters, g, g, g).requires_grad_()
    rot = torch.as_tensor(euler_to_matrix(random_euler(a.batch, np.random.default_rng(0))), dtype=torch.float32)
    ctf, sig = torch.rand(a.batch, len(pts)), torch.randn(a.batch, len(pts), 2)
    with torch.no_grad():
        torch.testing.assert_close(bank(rot, ctf, sig), direct_responses(bank, rot, ctf, sig, grid),
                                   atol=1e-4, rtol=1e-4)
    layer = torch.nn.Linear(2 * len(pts), 256)
    ms = [per_step_ms(lambda: bank(rot, ctf, sig), a.reps),
          per_step_ms(lambda: direct_responses(bank, rot, ctf, sig, grid), a.reps),
          per_step_ms(lambda: layer(sig.reshape(a.batch, -1)), a.reps)]
    return f"| {box} | {apix:g} | {len(bank.sel)} | {nv} | " + " | ".join(f"{m:.1f}" for m in ms) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res_A", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("| box | Å/px | filter pixels | voxels per filter | adjoint (ms) | grid_sample at ±k (ms) "
          "| pixel layer (ms) |")
    print("|---|---|---|---|---|---|---|")
    for box, apix in ((32, 4.0), (64, 6.0), (128, 3.0)):
        print(row(box, apix, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
