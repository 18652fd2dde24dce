"""``cryohet principal-volumes``: mean and K principal volumes from the images, poses and CTF known (survey §5)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import Method, Param

PARAMS = (
    Param("particles", str, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("datadir", str, "", "Folder to look for the particle stacks in (empty: beside the particle file).",
          expert=True),
    Param("mask", str, "", "3-D mask (MRC, same box and pixel size as the particles, values 0..1) restricting "
          "where the principal volumes may vary; empty: a soft sphere.", input_role="mask"),
    Param("n_components", int, 3, "Number K of principal volumes (per-particle coordinates b_1..b_K).",
          min=1, max=50),
    Param("resolution_A", float, 10.0, "Resolution limit of the principal volumes, Å: images are Fourier-cropped "
          "to it for the fit and the principal volumes are band-limited there (0: Nyquist); the mean is the "
          "homogeneous reconstruction at the images' full resolution. 6-12 Å is usual for a first look.", min=0.0),
    Param("max_iter", int, 30, "Most EM iterations (passes over the particles).", min=1),
    Param("tol", float, 1e-3, "Stop when the sine of the largest principal angle between successive component "
          "subspaces is below this.", min=0.0, expert=True),
    Param("regularisation", float, 1.0, "Prior strength T of the per-shell prior 1/(T τ²) (RELION's tau2_fudge): "
          "larger trusts the data more.", min=1e-6, expert=True),
    Param("prior", str, "mean", "Per-shell prior on the components: mean (they may have up to the mean map's signal "
          "power; robust at low SNR) or moments (their own signal power estimated from the data, which sets "
          "variability not supported above the noise to zero; may also remove weak real variability at low SNR).",
          choices=("mean", "moments"), expert=True),
    Param("movie_frames", int, 11, "Maps per component movie X_0 + τ X_k, τ from the 2nd to the 98th percentile "
          "of b_k.", min=2, max=200),
    Param("batch_size", int, 256, "Particles per batch (memory ~ batch_size × box² × (K+1) × 8 bytes).", min=1,
          expert=True),
    Param("pad", int, 2, "Fourier padding factor of the projection and insertion grids.", choices=(1, 2, 3),
          expert=True),
    Param("cache_mb", float, 1024.0, "Keep the Fourier-cropped images in memory when they fit in this many MiB "
          "(else they are read again at each iteration).", min=0.0, expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (checkpoint.safetensors, "
          "written after every EM iteration; the one before is kept as checkpoint.prev.safetensors and used when "
          "the newest is damaged); --max_iter is the new total. The other settings must be the same."),
)


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


def _convergence_line(converged: bool, last_change: float, tol: float, iterations: int) -> str:
    """The report's line on whether EM met --tol (changes: sines of the largest principal angle between
    successive component subspaces)."""
    if converged:
        return f"- converged: last subspace change (sine) {last_change:.2e} below --tol {tol:.2e}"
    return (f"- **did not converge**: EM stopped at the iteration limit (--max_iter) after {iterations} iterations "
            f"with a last subspace change (sine) of {last_change:.2e} against --tol {tol:.2e}; run more iterations "
            "(--resume yes with a larger --max_iter continues from the checkpoint) or loosen --tol")


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.analysis.volumes import write_chimerax_script, write_volume_series
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.inference.ppca import check_inputs, fit_principal_volumes
    from cryohet.io.mrc import read_mask, write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._fit_outputs import fit_columns
    from cryohet.models.linear import LinearModel
    from cryohet.reconstruct.fsc import resolution_at
    from cryohet.validation.goodness import maps_predictor

    pset = load_particles(params["particles"], params["datadir"] or None)
    K = params["n_components"]
    mask = read_mask(params["mask"], pset.box, pset.apix) if params["mask"] else None
    check_inputs(len(pset), pset.box, pset.apix, K, params["resolution_A"], mask, params["particles"],
                 params["mask"] or None)
    res = fit_principal_volumes(
        pset, K, resolution_A=params["resolution_A"], mask=mask, max_iter=params["max_iter"], tol=params["tol"],
        batch_size=params["batch_size"], pad=params["pad"], regularisation=params["regularisation"],
        prior=params["prior"], device=ctx.device, seed=params["seed"],
        cache_mb=params["cache_mb"], progress=ctx.progress, log=ctx.log,
        checkpoint=Path(ctx.out_dir) / "checkpoint.safetensors", resume=params["resume"])
    ctx.report_convergence("principal-volumes EM (subspace change, sine)", res.converged, res.last_change, res.tol,
                           res.iterations)
    out = Path(ctx.out_dir)
    apix = pset.apix

    model = LinearModel(res.mean, res.components, res.eigenvalues, apix,
                        info={"work_box": res.work_box, "resolution_A": res.resolution_A,
                              "n_particles": len(pset), "iterations": len(res.history)})
    model.save(out / "linear_model.npz")
    ctx.add("model", "linear_model.npz", f"linear model: mean + {K} principal volumes", model_type="linear",
            latent_dim=K, box=pset.box, apix=apix)

    mean_res = resolution_at(res.mean_fsc, pset.box, apix, 0.143)
    write_map(out / "mean.mrc", res.mean, apix)
    ctx.add("volume", "mean.mrc", "mean map X_0 (homogeneous reconstruction)", resolution_A=mean_res)
    for k in range(K):
        name = f"component_{k + 1:02d}.mrc"
        write_map(out / name, res.components[k], apix)
        ctx.add("volume", name, f"principal volume X_{k + 1}", component=k + 1,
                eigenvalue=float(res.eigenvalues[k]), resolution_A=float(res.component_resolution_A[k]))

    save_npy(out / "latents.npy", res.latents.astype(np.float32))
    save_npy(out / "latents_std.npy", res.latent_std.astype(np.float32))
    ctx.add("latents", "latents.npy", f"principal-volume coordinates b (N, {K})", dim=K, std="latents_std.npy")

    cols = {f"cryohetZ{k + 1}": res.latents[:, k] for k in range(K)}
    cols.update({f"cryohetStdZ{k + 1}": res.latent_std[:, k] for k in range(K)})
    maps = torch.as_tensor(np.concatenate([res.mean[None], res.components]), device=ctx.device)
    coef = np.concatenate([np.ones((len(pset), 1)), res.latents], 1)
    cols.update(fit_columns(ctx, pset, maps_predictor(maps, coef), maps_predictor(maps[:1]),
                            batch_size=params["batch_size"]))
    write_particles_star(out / "particles.star", pset, extra_columns=cols)
    ctx.add("particles_star", "particles.star", f"particles with cryohetZ1..{K} (and their s.d. cryohetStdZ1..{K}), "
            "goodness of fit (cryohetFitZ, cryohetResidualZ)",
            columns=[f"cryohetZ{k + 1}" for k in range(K)])

    # movies along each component, survey equation 6: X_0 + τ X_k
    n_frames = params["movie_frames"]
    for k in range(K):
        lo, hi = np.percentile(res.latents[:, k], [2, 98])
        taus = np.linspace(lo, hi, n_frames)
        z = np.zeros((n_frames, K), dtype=np.float32)
        z[:, k] = taus
        folder = out / "movies" / f"component_{k + 1:02d}"
        series = write_volume_series(model, z, folder, prefix="frame", progress=ctx.progress,
                                     desc=f"movie {k + 1}")
        series.register(ctx, f"component_{k + 1}", f"movie along X_{k + 1}", component=k + 1,
                        per_map={"tau": [float(t) for t in taus]})
        cxc = out / "movies" / f"component_{k + 1:02d}.cxc"
        write_chimerax_script(cxc, series.files, series.level, title=f"X_0 + tau X_{k + 1}")
        ctx.add("chimerax", cxc, f"ChimeraX: movie along X_{k + 1}", component=k + 1)

    _plot(out / "latents.png", res.latents, res.eigenvalues)
    ctx.add("plot", "latents.png", "distribution of the coordinates b_k and the eigenvalues")

    lines = [f"# principal volumes: {len(pset)} particles, K = {K}", "",
             f"- working box {res.work_box} px, resolution limit {res.resolution_A:.2f} Å, "
             f"{res.iterations} EM iterations",
             _convergence_line(res.converged, res.last_change, res.tol, res.iterations),
             f"- mean X_0: the homogeneous reconstruction of the particles (half-sets, plain division, weighted per "
             f"shell by their FSC), half-map FSC 0.143 at {mean_res:.2f} Å",
             "- each principal volume is fitted in the two half-sets with the same coordinates and weighted per "
             "shell by their FSC (√(2 FSC / (1 + FSC))): it holds no detail beyond what both halves agree on",
             "", "| k | eigenvalue (second moment of b_k) | fraction | s.d. of b_k | mean posterior s.d. | "
             "half-set FSC 0.143 (Å) |", "|---|---|---|---|---|---|"]
    total = float(res.eigenvalues.sum()) or 1.0
    for k in range(K):
        lines.append(f"| {k + 1} | {res.eigenvalues[k]:.4g} | {res.eigenvalues[k] / total:.3f} | "
                     f"{res.latents[:, k].std():.4g} | {res.latent_std[:, k].mean():.4g} | "
                     f"{res.component_resolution_A[k]:.2f} |")
    lines += ["", "Every run returns K components, a homogeneous set too (they then fit noise). Whether they are real: "
              "`cryohet validate-halfsets --method principal-volumes --particles <the same particles> "
              f"--method_params \"n_components={K} resolution_A={params['resolution_A']:g}\"` "
              "(flagged when the halves disagree)."]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    ctx.add("report", "report.md", "principal volumes: eigenvalues and settings")


METHOD = Method(
    name="principal-volumes",
    order=30,
    title="Mean and principal volumes from the images (3-D PCA, poses known)",
    help="Estimates the mean map X_0 and K principal volumes X_k directly from the particle images with their "
         "poses and CTF (survey section 5: V ≈ X_0 + Σ b_k X_k). The mean is the homogeneous reconstruction of "
         "the particles at full resolution (half-sets, plain division, weighted per shell by their FSC); the "
         "principal volumes are fitted to the images' residuals by probabilistic PCA with EM in Fourier space "
         "as cryoSPARC's 3D variability analysis (per-particle K×K E-step, per-voxel M-step, per-shell noise "
         "and prior), then refitted in each half-set with the same coordinates and weighted per shell by their "
         "half-set FSC. "
         "The principal volumes are limited to --resolution_A and to --mask. Writes the mean and "
         "the orthonormal principal volumes (MRC), per-particle coordinates b_k with their posterior s.d. "
         "(latents.npy, latents_std.npy; the particles STAR with cryohetZ1..K and each particle's goodness of "
         "fit under its mean + Σ b_k X_k against the mean's, cryohetFitZ and cryohetResidualZ, histogram "
         "fit_z.png), movies X_0 + τ X_k along each component (survey equation 6) with ChimeraX scripts, the "
         "linear model (for analyze / eval-volume), a plot of the coordinates and a short report. A fast, "
         "interpretable first look before a neural model. "
         "A checkpoint is written after every EM iteration: --resume yes continues after a crash or kill. Whether "
         "EM met --tol or stopped at --max_iter is reported in the log, the report and the run record.",
    params=PARAMS,
    outputs=("model", "volume", "latents", "particles_star", "volume_series", "chimerax", "plot", "report"),
    run=run,
    citations=(
        "Tagare, Kucukelbir, Sigworth, Wang & Rao (2015) Directly reconstructing principal components of "
        "heterogeneous particles from cryo-EM images. J. Struct. Biol. 191, 245-262.",
        "Punjani & Fleet (2021) 3D variability analysis: resolving continuous flexibility and discrete "
        "heterogeneity from single particle cryo-EM. J. Struct. Biol. 213, 107702.",
        "Andén & Singer (2018) Structural variability from noisy tomographic projections. SIAM J. Imaging "
        "Sci. 11, 1441-1492.",
    ),
)
