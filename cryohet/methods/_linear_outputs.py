"""Outputs of the methods whose model is linear, V(b) = X_0 + Σ b_k X_k (principal-volumes, moments): the linear
model, the mean and principal volumes, coordinates, particles STAR with goodness of fit, movies along each
component with ChimeraX scripts and the coordinates' plot.

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plot(path: Path, b: np.ndarray, eigenvalues: np.ndarray) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    K = b.shape[1]
    show = min(K, 4)
    fig = Figure(figsize=(2.6 * (show + 1), 2.4 * show), layout="constrained")
    axes = fig.subplots(show, show + 1, squeeze=False)
    for i in range(show):
        for j in range(show):
            ax = axes[i, j]
            if i == j:
                ax.hist(b[:, i], bins=60, color="C0")
                ax.set(xlabel=f"b{i + 1}")
            elif i > j:
                ax.hexbin(b[:, j], b[:, i], gridsize=40, bins="log", cmap="viridis", mincnt=1)
                ax.set(xlabel=f"b{j + 1}", ylabel=f"b{i + 1}")
            else:
                ax.axis("off")
    ax = axes[0, show]
    ax.bar(np.arange(1, K + 1), eigenvalues, color="C1")
    ax.set(xlabel="component k", ylabel="variance of b_k", title="eigenvalues")
    for i in range(1, show):
        axes[i, show].axis("off")
    fig.suptitle("principal-volume coordinates")
    save_png(fig, path, dpi=90)


def eigenvalue_table(eigenvalues: np.ndarray, latents: np.ndarray, latent_std: np.ndarray,
                     component_resolution_A: np.ndarray | None = None) -> list[str]:
    """Markdown rows of a report: each component's eigenvalue, its fraction, the s.d. of b_k and the mean
    posterior s.d. (and its half-set FSC 0.143 resolution when given)."""
    res = component_resolution_A
    lines = ["| k | eigenvalue (mean of b_k²) | fraction | s.d. of b_k | mean posterior s.d. |"
             + (" half-set FSC 0.143 (Å) |" if res is not None else ""),
             "|---|---|---|---|---|" + ("---|" if res is not None else "")]
    total = float(eigenvalues.sum()) or 1.0
    for k in range(len(eigenvalues)):
        lines.append(f"| {k + 1} | {eigenvalues[k]:.4g} | {eigenvalues[k] / total:.3f} | "
                     f"{latents[:, k].std():.4g} | {latent_std[:, k].mean():.4g} |"
                     + (f" {res[k]:.2f} |" if res is not None else ""))
    return lines


def write_linear_maps(ctx: Any, pset: Any, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray, *,
                      resolution_A: float, info: dict[str, Any], mean_label: str = "mean map X_0",
                      component_resolution_A: np.ndarray | None = None) -> Any:
    """Write and record the linear model (``linear_model.npz``, model_type ``linear`` for analyze / eval-volume /
    benchmark-score), ``mean.mrc`` and ``component_NN.mrc``; returns the ``LinearModel``. ``resolution_A``: the
    mean's; ``component_resolution_A`` (K,): each principal volume's, when known."""
    from cryohet.io.mrc import write_map
    from cryohet.models.linear import LinearModel

    out = Path(ctx.out_dir)
    apix = pset.apix
    K = len(components)
    model = LinearModel(mean, components, eigenvalues, apix, info=info)
    model.save(out / "linear_model.npz")
    ctx.add("model", "linear_model.npz", f"linear model: mean + {K} principal volumes", model_type="linear",
            latent_dim=K, box=pset.box, apix=apix)

    write_map(out / "mean.mrc", mean, apix)
    ctx.add("volume", "mean.mrc", mean_label, resolution_A=resolution_A)
    for k in range(K):
        name = f"component_{k + 1:02d}.mrc"
        write_map(out / name, components[k], apix)
        extra = {} if component_resolution_A is None else {"resolution_A": float(component_resolution_A[k])}
        ctx.add("volume", name, f"principal volume X_{k + 1}", component=k + 1,
                eigenvalue=float(eigenvalues[k]), **extra)
    return model


def write_component_movies(ctx: Any, model: Any, ranges: np.ndarray, movie_frames: int) -> None:
    """Movies X_0 + τ X_k (survey equation 6), τ over ``ranges[k]`` = (low, high) in ``movie_frames`` maps, with
    ChimeraX scripts, registered."""
    from cryohet.analysis.volumes import write_chimerax_script, write_volume_series

    out = Path(ctx.out_dir)
    K = len(ranges)
    for k in range(K):
        taus = np.linspace(ranges[k][0], ranges[k][1], movie_frames)
        z = np.zeros((movie_frames, K), dtype=np.float32)
        z[:, k] = taus
        folder = out / "movies" / f"component_{k + 1:02d}"
        series = write_volume_series(model, z, folder, prefix="frame", progress=ctx.progress,
                                     desc=f"movie {k + 1}")
        series.register(ctx, f"component_{k + 1}", f"movie along X_{k + 1}", component=k + 1,
                        per_map={"tau": [float(t) for t in taus]})
        cxc = out / "movies" / f"component_{k + 1:02d}.cxc"
        write_chimerax_script(cxc, series.files, series.level, title=f"X_0 + tau X_{k + 1}")
        ctx.add("chimerax", cxc, f"ChimeraX: movie along X_{k + 1}", component=k + 1)


def write_linear_outputs(ctx: Any, pset: Any, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray,
                         latents: np.ndarray, latent_std: np.ndarray, *, resolution_A: float, info: dict[str, Any],
                         movie_frames: int, batch_size: int, mean_label: str = "mean map X_0",
                         refined_pose_columns: dict[str, np.ndarray] | None = None,
                         component_resolution_A: np.ndarray | None = None) -> None:
    """The linear model and maps (``write_linear_maps``), ``latents.npy`` and ``latents_std.npy`` (N, K), the
    particles STAR with cryohetZ/cryohetStdZ and goodness of fit, movies X_0 + τ X_k (τ from the 2nd to the 98th
    percentile of b_k, ``write_component_movies``) and ``latents.png``. ``refined_pose_columns``: RELION's pose
    columns of refined poses, which replace the input's in the STAR."""
    import torch

    from cryohet.atomic import save_npy
    from cryohet.io.particles import write_particles_star
    from cryohet.methods._fit_outputs import fit_columns
    from cryohet.validation.goodness import maps_predictor

    out = Path(ctx.out_dir)
    K = len(components)
    model = write_linear_maps(ctx, pset, mean, components, eigenvalues, resolution_A=resolution_A, info=info,
                              mean_label=mean_label, component_resolution_A=component_resolution_A)

    save_npy(out / "latents.npy", latents.astype(np.float32))
    save_npy(out / "latents_std.npy", latent_std.astype(np.float32))
    ctx.add("latents", "latents.npy", f"principal-volume coordinates b (N, {K})", dim=K, std="latents_std.npy")

    cols = {f"cryohetZ{k + 1}": latents[:, k] for k in range(K)}
    cols.update({f"cryohetStdZ{k + 1}": latent_std[:, k] for k in range(K)})
    maps = torch.as_tensor(np.concatenate([mean[None], components]), device=ctx.device)
    coef = np.concatenate([np.ones((len(pset), 1)), latents], 1)
    cols.update(fit_columns(ctx, pset, maps_predictor(maps, coef), maps_predictor(maps[:1]), batch_size=batch_size))
    refined = refined_pose_columns is not None
    cols.update(refined_pose_columns or {})
    write_particles_star(out / "particles.star", pset, extra_columns=cols)
    ctx.add("particles_star", "particles.star", f"particles with cryohetZ1..{K} (and their s.d. cryohetStdZ1..{K}), "
            "goodness of fit (cryohetFitZ, cryohetResidualZ)" + (", the refined poses" if refined else ""),
            columns=[f"cryohetZ{k + 1}" for k in range(K)], refined_poses=refined)

    write_component_movies(ctx, model, np.percentile(latents, [2, 98], axis=0).T, movie_frames)
    _plot(out / "latents.png", latents, eigenvalues)
    ctx.add("plot", "latents.png", "distribution of the coordinates b_k and the eigenvalues")
