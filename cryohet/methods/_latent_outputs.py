"""Outputs shared by the methods that give each particle a latent point: the .npy files and the particles STAR.

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import save_npy
from cryohet.io.particles import ParticleSet, write_particles_star
from cryohet.methods._fit_outputs import fit_columns
from cryohet.methods._pose_outputs import pose_columns, refined_particles, write_pose_changes
from cryohet.validation.goodness import latent_predictors


def write_latents(ctx: Any, pset: ParticleSet, arrays: dict[str, np.ndarray], z: np.ndarray, latents_label: str,
                  star_label: str, extra_columns: dict[str, np.ndarray] | None = None, *, poses: Any = None,
                  fit_model: Any = None, fit_batch: int = 64, fit_amp: str = "no",
                  star_meta: dict[str, Any] | None = None, **meta: Any) -> None:
    """Write ``arrays`` (file name -> array, rows in particle-file order) as .npy files in ``ctx.out_dir`` and
    ``particles.star``: ``pset`` with cryohetZ1..d from ``z`` (N, d) and ``extra_columns`` (and, with ``poses``
    (``PoseCorrections``), the refined poses, their changes written by ``write_pose_changes``); record the first
    array as the run's ``latents`` (``dim`` and ``meta``) and the STAR as its ``particles_star`` (``star_meta``
    added to its record entry, e.g. ``poses=True`` when it carries new poses). With ``fit_model`` (a
    ``SliceModel`` on the device to score on) the STAR gets each particle's goodness of fit under it at its
    latent and (refined) pose (``cryohetFitZ``, ``cryohetResidualZ``, ``fit_z.png``; ``fit_batch`` particles at a
    time, under the mixed precision ``fit_amp``, inside the model's fitted circle ``cfg.max_freq`` when it has one)."""
    out = Path(ctx.out_dir)
    refined = refined_particles(pset, poses)
    if fit_model is not None:
        fit = fit_columns(ctx, refined, *latent_predictors(fit_model, z), box=fit_model.box, batch_size=fit_batch,
                          amp=fit_amp, max_freq=getattr(getattr(fit_model, "cfg", None), "max_freq", 0.5))
        extra_columns = {**(extra_columns or {}), **fit}
        star_label += ", goodness of fit (cryohetFitZ, cryohetResidualZ)"
    for name, arr in arrays.items():
        save_npy(out / name, arr)
    cols = {f"cryohetZ{i + 1}": z[:, i] for i in range(z.shape[1])}
    write_particles_star(out / "particles.star", refined, extra_columns={
        **cols, **(extra_columns or {}), **(pose_columns(refined) if poses is not None else {})})
    ctx.add("latents", next(iter(arrays)), latents_label, dim=z.shape[1], **meta)
    ctx.add("particles_star", "particles.star", star_label + (" and the refined poses" if poses is not None else ""),
            columns=list(cols), refined_poses=poses is not None, **(star_meta or {}))
    if poses is not None:
        write_pose_changes(ctx, poses)
