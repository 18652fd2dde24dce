"""Outputs shared by the methods that give each particle a latent point: the .npy files and the particles STAR.

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.io.particles import ParticleSet, write_particles_star
from cryohet.methods._pose_outputs import pose_columns, refined_particles, write_pose_changes


def write_latents(ctx: Any, pset: ParticleSet, arrays: dict[str, np.ndarray], z: np.ndarray, latents_label: str,
                  star_label: str, extra_columns: dict[str, np.ndarray] | None = None, poses: Any = None,
                  **meta: Any) -> None:
    """Write ``arrays`` (file name -> array, rows in particle-file order) as .npy files in ``ctx.out_dir`` and
    ``particles.star``: ``pset`` with cryohetZ1..d from ``z`` (N, d) and ``extra_columns`` (and, with ``poses``
    (``PoseCorrections``), the refined poses, their changes written by ``write_pose_changes``); record the first
    array as the run's ``latents`` (``dim`` and ``meta``) and the STAR as its ``particles_star``."""
    out = Path(ctx.out_dir)
    for name, arr in arrays.items():
        with atomic_path(out / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr)
    cols = {f"cryohetZ{i + 1}": z[:, i] for i in range(z.shape[1])}
    refined = refined_particles(pset, poses)
    write_particles_star(out / "particles.star", refined, extra_columns={
        **cols, **(extra_columns or {}), **(pose_columns(refined) if poses is not None else {})})
    ctx.add("latents", next(iter(arrays)), latents_label, dim=z.shape[1], **meta)
    ctx.add("particles_star", "particles.star", star_label + (" and the refined poses" if poses is not None else ""),
            columns=list(cols), refined_poses=poses is not None)
    if poses is not None:
        write_pose_changes(ctx, poses)
