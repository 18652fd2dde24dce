"""What ``cryohet train-gmm`` writes beside its model and latents: maps and pseudo-atom models along the first
principal components of z and at k-means centres, per-Gaussian displacements along PC1 with a ChimeraX script,
latent and deformation-error plots, the half-set error arrays.

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.analysis import plots
from cryohet.analysis.latent import kmeans, pc_traversal, pca
from cryohet.analysis.normal_modes import write_mode_chimerax
from cryohet.analysis.volumes import write_series
from cryohet.atomic import atomic_path, save_npy
from cryohet.io.atomic_model import model_suffix, write_models
from cryohet.reconstruct.fsc import fsc, resolution_at


def consensus_fit(fitted: np.ndarray, target: np.ndarray, consensus: np.ndarray, apix: float, resolution_A: float
                  ) -> dict[str, Any]:
    """How the Gaussians' map ``fitted`` (band-limited at ``resolution_A``) reproduces the (masked) consensus
    ``target``: correlation, FSC per shell, its mean over the shells up to 1/resolution_A, resolution (Å) at
    FSC 0.5; and the correlation with the whole ``consensus`` map."""
    box = target.shape[0]
    curve = fsc(fitted, target)
    top = max(1, min(len(curve) - 1, int(box * apix / resolution_A)))
    return {"correlation": float(np.corrcoef(fitted.ravel(), target.ravel())[0, 1]),
            "fsc_mean_to_resolution": float(curve[1:top + 1].mean()), "fsc_0.5_A": resolution_at(curve, box, apix, 0.5),
            "correlation_unmasked": float(np.corrcoef(fitted.ravel(), consensus.ravel())[0, 1]),
            "fsc": curve.round(5).tolist()}


TITLE = "cryohet train-gmm"  # ChimeraX scripts' titles


def write_gmm_outputs(ctx: Any, model: Any, z: np.ndarray, params: dict[str, Any],
                      halves: dict[str, Any] | None) -> dict[str, Any]:
    """Write and register the maps, models, displacement fields, plots and half-set arrays of a trained
    Gaussian mixture ``model`` with latents ``z`` (N, d); returns their summary for the report."""
    out = Path(ctx.out_dir)
    atoms = model.atoms
    suffix = model_suffix(params["model"], len(atoms))
    pcs = pca(z)
    coords = pcs.transform(z)
    ratio = pcs.explained_variance_ratio
    summary: dict[str, Any] = {"pc_variance_ratio": ratio.tolist()}
    for i in range(min(2, z.shape[1])):
        name = f"pc{i + 1}"
        pts, vals = pc_traversal(z, pcs, i, params["n_maps"])
        series = write_series(ctx, model, pts, name, f"map along PC{i + 1} ({100 * ratio[i]:.1f} %)",
                              per_map={"pc_value": vals.round(6).tolist()}, title=TITLE, pc=i + 1)
        frames = model.frames_A(pts)
        with atomic_path(out / name / "z_values.txt") as tmp:
            np.savetxt(tmp, pts, fmt="%.6g", header=f"latent points along PC{i + 1}")
        movie = out / name / f"models{suffix}"
        write_models(movie, atoms, frames)
        ctx.add("atomic_model", str(movie.relative_to(out)), f"{params['n_maps']} pseudo-atom models along PC{i + 1}, "
                "5th to 95th percentile", pc=i + 1)
        disp = frames - atoms.xyz_A[None]
        save_npy(out / name / "displacements.npy", disp.astype(np.float32))
        summary[f"{name}_values"] = vals.tolist()
        summary[f"{name}_displacement_A"] = {"rms_end_to_end": float(np.sqrt(((disp[-1] - disp[0]) ** 2)
                                                                            .sum(-1).mean())),
                                             "max_end_to_end": float(np.linalg.norm(disp[-1] - disp[0], axis=-1)
                                                                     .max())}
        cxc = write_mode_chimerax(out / f"{name}_movie.cxc", movie, series.files, series.level,
                                  f"{TITLE}: pseudo-atoms and maps along PC{i + 1}")
        ctx.add("chimerax", cxc.name, f"ChimeraX: the pseudo-atom models (#1) and maps (#2) along PC{i + 1}, "
                "played together", series=name, displacements=f"{name}/displacements.npy")
    labels = centres = None
    if params["n_clusters"]:
        km = kmeans(z, min(params["n_clusters"], len(z)), seed=params["seed"])
        labels, centres = km.labels, pcs.transform(km.centers)
        name = f"kmeans{km.k}"
        write_series(ctx, model, km.centers, name, f"map at a k-means centre (K={km.k})",
                     per_map={"cluster": list(range(km.k)), "particle_index": km.center_indices.tolist()},
                     title=TITLE, k=km.k)
        write_models(out / name / f"models{suffix}", atoms, model.frames_A(km.centers))
        save_npy(out / name / "labels.npy", km.labels.astype(np.int64))
        ctx.add("atomic_model", f"{name}/models{suffix}", f"pseudo-atom models at the {km.k} k-means centres of z",
                clusters=km.k, labels=f"{name}/labels.npy")
        summary["cluster_sizes"] = np.bincount(km.labels, minlength=km.k).tolist()
    xy = coords[:, :2] if z.shape[1] > 1 else coords[:, 0]
    ctx.add("plot", plots.scatter_plot(xy, out / "latent_pca.png", labels=labels,
                                       centers=None if centres is None or z.shape[1] < 2 else centres[:, :2],
                                       xlabel=f"PC1 ({100 * ratio[0]:.1f} %)",
                                       ylabel=f"PC2 ({100 * ratio[1]:.1f} %)" if z.shape[1] > 1 else "",
                                       title=f"latents ({len(z)} particles)"), "PCA of the latents")
    if halves is not None:
        for fname, arr in halves["arrays"].items():
            save_npy(out / fname, arr)
        ctx.add("latents", "deformation_error.npy", "per-particle deformation error (Å): RMS over the Gaussians "
                "of the difference of the two half-set models' displacements", content="deformation_error",
                half_latents=["half1_z.npy", "half2_z.npy"], gaussian_error="gaussian_error.npy")
        err = halves["error"]
        ctx.add("plot", plots.histogram_plot(err, out / "deformation_error.png", xlabel="deformation error (Å)",
                                             title="half-set deformation error per particle"),
                "histogram of the per-particle deformation error")
        if z.shape[1] > 1:
            ctx.add("plot", _error_scatter(coords[:, :2], err, out / "deformation_error_pca.png"),
                    "latents coloured by the deformation error")
        marked = dataclasses.replace(atoms, b_factor=np.asarray(halves["per_gaussian"], np.float64))
        write_models(out / f"gaussian_error{suffix}", marked, atoms.xyz_A[None])
        ctx.add("atomic_model", f"gaussian_error{suffix}", "reference Gaussians with their half-set deformation "
                "error (RMS over particles, Å) in the B-factor column")
    return summary


def _error_scatter(xy: np.ndarray, err: np.ndarray, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=err, s=4, cmap="viridis", linewidths=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label="deformation error (Å)")
    ax.set(xlabel="PC1", ylabel="PC2", title="latents coloured by the half-set deformation error")
    return plots.save_png(fig, path)
