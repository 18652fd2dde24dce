"""Reading what analysis needs from run folders: latents, particles STAR, analyze results.

A training run (linear, VAE, ...) registers ``latents`` (.npy (N, d), particles-STAR row order),
``model`` and ``particles_star``; an ``analyze`` run registers derived arrays as ``latents`` too,
marked with ``meta["content"]`` in ``DERIVED_CONTENT``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.errors import InputError
from cryohet.record import Output, RunRecord, read_record

if TYPE_CHECKING:
    from cryohet.io.particles import ParticleSet

#: ``meta["content"]`` of latents outputs that are not the latent coordinates themselves.
DERIVED_CONTENT = ("pca", "umap", "kmeans_labels")


def latents_output(record: RunRecord, run_dir: Path) -> Output:
    """The output holding the latent coordinates: the first ``latents`` output not marked as derived."""
    outs = [o for o in record.of_kind("latents") if o.meta.get("content") not in DERIVED_CONTENT]
    if not outs:
        raise InputError(run_dir, f"the {record.method} run holds no latent coordinates (no 'latents' output)")
    return outs[0]


def load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"cannot read {what} ({exc})") from None


def load_latents(run_dir: str | Path, override: str | Path | None = None) -> tuple[np.ndarray, Path]:
    """Latents (N, d) float32 of a run folder (or of the ``.npy`` file ``override``) and their path."""
    run_dir = Path(run_dir)
    if override:
        path = Path(override)
    else:
        record = read_record(run_dir)
        if record.status not in ("finished", "running"):
            raise InputError(run_dir, f"the {record.method} run did not finish (status {record.status})")
        path = run_dir / latents_output(record, run_dir).path
    z = load_npy(path, "latents")
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0 or not np.issubdtype(z.dtype, np.number):
        raise InputError(path, f"latents must be a numeric array (N, d), got {z.dtype} {z.shape}")
    if not np.all(np.isfinite(z)):
        raise InputError(path, "latents hold non-finite values")
    return z.astype(np.float32), path


def particles_star_path(run_dir: str | Path) -> Path:
    """The particles STAR registered by a run (its input particles, rows in latent order)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    path = run_dir / record.require("particles_star", run_dir, "particles STAR").path
    if not path.is_file():
        raise InputError(path, "particles STAR listed in the run record is missing")
    return path


@dataclass
class LatentInputs:
    """Particles and their latents as a method that works on any latent space reads them: ``particles`` (None
    when not given), ``z`` (N, d) float64 (None when not given), their s.d. ``std`` (N, d) or None, and the file
    the latents came from (``source``, for messages)."""

    particles: ParticleSet | None
    z: np.ndarray | None
    std: np.ndarray | None
    source: Path | None


def latent_inputs(params: dict[str, Any], need_particles: bool = True, need_latents: bool = True) -> LatentInputs:
    """Read ``--run`` (a run folder: its latents, their s.d. when it registers one, its particles STAR) or
    ``--particles`` / ``--latents`` (any tool's file: .npy, .txt/.csv, cryoDRGN's z.pkl) / ``--latents_std`` (when
    the method has it), with ``--datadir``. ValueError for a wrong combination, InputError for a bad file."""
    from cryohet.io.particles import load_particles
    from cryohet.validation.external import load_latents as load_latents_file

    alternative = ("--particles with --latents" if need_particles and need_latents else
                   "--particles (optionally with --latents)" if need_particles else
                   "--latents (optionally with --particles)")
    if params["run"] is not None:
        if any(params.get(k) is not None for k in ("particles", "latents", "latents_std")):
            raise ValueError(f"give --run, or {alternative}, not both")
        run_dir = Path(params["run"])
        z, zpath = load_latents(run_dir)
        std = None
        if "latents_std" in params:
            meta = latents_output(read_record(run_dir), run_dir).meta
            if meta.get("std"):
                std = load_npy(run_dir / meta["std"], "latent s.d.")
            elif meta.get("logvar"):
                std = np.exp(0.5 * load_npy(run_dir / meta["logvar"], "latent log-variance"))
        pset = load_particles(particles_star_path(run_dir), datadir=params["datadir"])
    else:
        if (need_particles and params["particles"] is None) or (need_latents and params["latents"] is None):
            raise ValueError(f"give --run (a heterogeneity run), or {alternative}")
        pset = load_particles(params["particles"], datadir=params["datadir"]) if params["particles"] else None
        zpath = Path(params["latents"]) if params["latents"] is not None else None
        z = load_latents_file(zpath) if zpath is not None else None
        std = load_latents_file(params["latents_std"]) if params.get("latents_std") is not None else None
    if z is not None:
        z = np.asarray(z, np.float64)
        z = z[:, None] if z.ndim == 1 else z
        if std is not None:
            std = np.asarray(std, np.float64)
            std = std[:, None] if std.ndim == 1 else std
            if std.shape != z.shape:
                raise InputError(zpath, f"latents {z.shape} and their s.d. {std.shape} differ in shape")
        if pset is not None and len(z) != len(pset):
            raise InputError(zpath, f"{len(z)} latent rows but {len(pset)} particles in {pset.source}")
    return LatentInputs(pset, z, std, zpath)


@dataclass
class AnalysisResult:
    """What an ``analyze`` folder holds: k-means ``labels`` (N,) and ``k`` (None without k-means),
    PC coordinates ``pca`` (N, k), ``umap`` (N, 2) (None when not computed), the analysed ``run``."""

    folder: Path
    labels: np.ndarray | None
    k: int | None
    pca: np.ndarray | None
    umap: np.ndarray | None
    run: Path | None


def load_analysis(folder: str | Path) -> AnalysisResult:
    """Read an ``analyze`` run folder."""
    folder = Path(folder)
    record = read_record(folder)
    if record.method != "analyze":
        raise InputError(folder, f"not an analyze run (it is a {record.method} run)")
    by_content = {o.meta.get("content"): o for o in record.of_kind("latents")}
    labels = k = pca = umap = None
    if "kmeans_labels" in by_content:
        out = by_content["kmeans_labels"]
        labels = load_npy(folder / out.path, "k-means labels").astype(np.int64).ravel()
        k = int(out.meta.get("k", int(labels.max()) + 1))
    if "pca" in by_content:
        pca = load_npy(folder / by_content["pca"].path, "PCA coordinates")
    if "umap" in by_content:
        umap = load_npy(folder / by_content["umap"].path, "UMAP coordinates")
    src = next((o.meta.get("source_run") for o in record.outputs if o.meta.get("source_run")), None)
    return AnalysisResult(folder, labels, k, pca, umap, Path(src) if src else None)
