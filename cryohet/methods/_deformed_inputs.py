"""What ``reconstruct-deformed`` reads from a deformation model's run folder, checked before anything is
computed or written; and the memory plan that refuses a box the device cannot hold.

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.device import refuse_unless_fits
from cryohet.errors import InputError
from cryohet.io.particles import ParticleSet, load_particles
from cryohet.models.base import load_volume_model, model_modules
from cryohet.reconstruct.deformed import memory_bytes
from cryohet.record import read_record

#: fraction of the device's free memory a reconstruction may plan to use
MEMORY_FRACTION = 0.8


@dataclass
class DeformationRun:
    run_dir: Path
    model: Any                 # a models.base.DeformationModel
    model_type: str
    particles: ParticleSet     # the run's particles STAR
    star: Path
    latents: np.ndarray        # (N, latent_dim) float32, rows = the STAR's
    latents_path: Path
    half_models: tuple[Any, Any] | None = None          # a model per half-set (train-gmm --halfsets), or None
    half_latents: tuple[np.ndarray, np.ndarray] | None = None  # every particle's latent under each half model


def _read_latents(path: Path, n: int, dim: int, star: Path) -> np.ndarray:
    """(n, dim) float32 latents of ``path``; InputError naming it when they are unreadable, of another shape
    than ``n`` particles (of ``star``) by ``dim`` coordinates, or not finite."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the latents ({exc})") from None
    z = np.asarray(z, dtype=np.float32).reshape(len(z), -1) if np.ndim(z) else z
    if np.ndim(z) != 2 or len(z) != n:
        raise InputError(path, f"latents of shape {np.shape(z)} do not match the {n} particles of {star}")
    if z.shape[1] != dim:
        raise InputError(path, f"latents have {z.shape[1]} coordinates, the model {dim}")
    if not np.isfinite(z).all():
        raise InputError(path, "the latents hold NaN or infinite values")
    return z


def read_deformation_run(run_dir: Path, datadir: Path | None) -> DeformationRun:
    """The model, particles and latents of ``run_dir``'s record; InputError naming the file when the model has no
    displacement field, or the latents do not match the particles or the model."""
    record = read_record(run_dir)
    model_out = record.require("model", run_dir, "model of the volumes")
    model_type = str(model_out.meta.get("model_type"))
    model = load_volume_model(run_dir)
    if not callable(getattr(model, "displacement_field", None)):
        raise InputError(run_dir / model_out.path, f"the {record.method} run's model ({model_type}) has no "
                         "displacement field: reconstruct-deformed needs a deformation model (train-gmm, "
                         "train-deform)")
    star = run_dir / record.require("particles_star", run_dir, "particles STAR").path
    lat_path = run_dir / record.require("latents", run_dir, "latents").path
    pset = load_particles(star, datadir=datadir)
    z = _read_latents(lat_path, len(pset), model.latent_dim, star)
    cols = [f"cryohetZ{i + 1}" for i in range(z.shape[1])]
    if all(c in pset.table for c in cols):
        star_z = pset.table[cols].to_numpy(dtype=np.float64)
        if not np.allclose(star_z, z, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(z).max()))):
            raise InputError(star, f"its {', '.join(cols)} columns differ from the latents of {lat_path}: the two "
                                   "files are not of the same particles in the same order")
    view_A, model_view_A = pset.box * pset.apix, model.box * model.apix
    if abs(view_A - model_view_A) > 0.01 * view_A:
        raise InputError(run_dir / model_out.path, f"the model's box spans {model_view_A:.1f} Å, the particles' "
                                                   f"{view_A:.1f} Å ({star}): not the same frame")
    run = DeformationRun(run_dir, model, model_type, pset, star, z, lat_path)
    halves, half_z = model_out.meta.get("half_models"), model_out.meta.get("half_latents")
    if halves and half_z:  # each half-set is reconstructed with the model trained on it alone
        if "rlnRandomSubset" not in pset.table:
            raise InputError(star, "the run has half-set models but its particles carry no rlnRandomSubset: the "
                                   "half-set of each particle is unknown")
        load = model_modules()[model_type].load_run_model
        run.half_models = tuple(load(run_dir, run_dir / p) for p in halves)
        run.half_latents = tuple(_read_latents(run_dir / p, len(pset), model.latent_dim, star) for p in half_z)
    return run


def check_memory(box: int, batch_size: int, voxel_chunk: int, device: torch.device, source: Path) -> None:
    """InputError naming ``source`` when a reconstruction at ``box`` does not fit in the device's free memory,
    with the largest box that does; checked before anything is allocated."""
    def largest_box(usable: float) -> str:
        fits = (b for b in range(box - 2, 0, -2) if memory_bytes(b, batch_size, voxel_chunk) <= usable)
        return f"box {next(fits, 0)}"

    refuse_unless_fits(memory_bytes(box, batch_size, voxel_chunk), device, MEMORY_FRACTION, source,
                       f"a deformation-corrected reconstruction at box {box}", largest_box,
                       "use --box of that size (Fourier cropping) or a smaller --batch_size")
