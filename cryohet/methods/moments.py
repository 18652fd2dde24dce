"""``cryohet moments``: mean map and covariance of the volumes from the images' moments, poses known (survey §8);
with ``--poses uniform`` a map (and a low-rank model) from the first three moments, poses unknown."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryohet.methods.base import DATADIR, Method, Param

PARAMS = (
    Param("particles", str, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs (with "
          "--poses uniform, angles are not needed and origins are undone where present).",
          required=True, input_role="particles"),
    DATADIR,
    Param("poses", str, "known", "known: the particles' poses are used (mean and covariance); uniform: they are "
          "unknown and taken as uniform on SO(3): a map (and, with --uniform_components, a low-rank model) fitted "
          "to the images' rotation-invariant first, second and third moments (orientation and hand arbitrary).",
          choices=("known", "uniform")),
    Param("n_components", int, 3, "Number K of principal volumes (top eigenvectors of the covariance) and "
          "per-particle coordinates b_1..b_K.", min=1, max=50),
    Param("resolution_A", float, 20.0, "Resolution limit of the covariance, Å: images are Fourier-cropped to it "
          "and the covariance lives in the band-limited basis there (its size grows as (box·apix / "
          "resolution)³ and each CG step's time as its square: 15-30 Å is usual; 0: Nyquist).", min=0.0),
    Param("diameter_A", float, 0.0, "Diameter of the ball, Å, that holds the variability (the basis functions "
          "are concentrated in it); 0: 0.9 of the box.", min=0.0),
    Param("max_iter", int, 30, "Most conjugate-gradient steps on the covariance's normal equations (each is one "
          "pass over the particles).", min=1),
    Param("tol", float, 1e-3, "Stop CG when the residual of the normal equations relative to their right-hand "
          "side is below this.", min=0.0, expert=True),
    Param("regularisation", float, 1e-3, "Tikhonov weight of the covariance (and of the mean in the basis), as a "
          "fraction of the data term's mean diagonal (squared for the covariance).", min=0.0, expert=True),
    Param("movie_frames", int, 11, "Maps per component movie X_0 + τ X_k, τ from the 2nd to the 98th percentile "
          "of b_k.", min=2, max=200),
    Param("batch_size", int, 256, "Particles per batch (memory ~ batch_size × 4 × pixels inside the limit × "
          "basis size × 4 bytes).", min=1, expert=True),
    Param("uniform_components", int, 0, "With --poses uniform: number K of components W_k of the low-rank model "
          "V = μ + Σ z_k W_k, z ~ N(0, I), fitted after the map (0: the map only).", min=0, max=4),
    Param("quadrature_deg", float, 20.0, "With --poses uniform: step, degrees, between the projection directions "
          "of the quadrature of the model's moments (memory and time grow as its inverse square).", min=3.0,
          max=45.0, expert=True),
    Param("defocus_groups", int, 4, "With --poses uniform: particles are split into this many groups by defocus, "
          "each with its own moments and CTF in the model (memory and time grow with it).", min=1, max=16,
          expert=True),
    Param("n_starts", int, 4, "With --poses uniform: random starts of the fit (the best is kept).", min=1,
          expert=True),
    Param("fit_iter", int, 50, "With --poses uniform: L-BFGS steps per stage of frequency marching.", min=1,
          expert=True),
    Param("cache_mb", float, 1024.0, "Keep the Fourier-cropped images in memory when they fit in this many MiB "
          "(else they are read again at each pass).", min=0.0, expert=True),
    Param("shrinkage", str, "frobenius", "Eigenvalue shrinkage of the covariance's right-hand side before CG (Andén & "
          "Singer 2018): its second moment whitened by the mean projection-backprojection operator, the eigenvalues "
          "inside the noise's Marchenko-Pastur bulk set to 0 and those above it debiased (operator: the spike's "
          "value; frobenius: also times its squared cosine, Donoho-Gavish-Johnstone; none: as estimated).",
          choices=("none", "operator", "frobenius")),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint "
          "(checkpoint.safetensors; the one before is kept as checkpoint.prev.safetensors and used when the newest "
          "is damaged). Poses known: written after every CG step; --max_iter is the new total and --tol may change. "
          "Poses uniform: the moments' sums every minute of their pass and at its end, then after every random "
          "start and marching stage of the fits. The other settings must be the same."),
)


def run(params: dict[str, Any], ctx: Any) -> None:
    import numpy as np

    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.inference.moments import fit_moments
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import load_particles
    from cryohet.methods._linear_outputs import eigenvalue_table, write_linear_outputs
    from cryohet.reconstruct.homogeneous import particle_halves, reconstruct_halves

    uniform = params["poses"] == "uniform"
    pset = load_particles(params["particles"], params["datadir"] or None, require_poses=not uniform)
    if uniform:
        return run_uniform(params, pset, ctx)
    K = params["n_components"]
    res = fit_moments(pset, K, resolution_A=params["resolution_A"], diameter_A=params["diameter_A"],
                      max_iter=params["max_iter"], tol=params["tol"], regularisation=params["regularisation"],
                      batch_size=params["batch_size"], device=ctx.device, seed=params["seed"],
                      cache_mb=params["cache_mb"], progress=ctx.progress, log=ctx.log,
                      checkpoint=Path(ctx.out_dir) / "checkpoint.safetensors", resume=params["resume"],
                      shrinkage=params["shrinkage"])
    ctx.report_convergence("moments CG (relative residual of the normal equations)", res.converged,
                           res.last_change, res.tol, res.iterations)
    # the mean map X_0: CTF-weighted backprojection of half-sets at the full box, Wiener-filtered from their FSC
    half = particle_halves(pset, params["seed"])
    rec = reconstruct_halves(pset, half, params["batch_size"], ctx.device, progress=ctx.progress)
    mean_res = rec.resolution(0.143)
    ctx.log.info("mean map: resolution at FSC 0.143 %.2f Å", mean_res)
    out = Path(ctx.out_dir)
    write_linear_outputs(ctx, pset, rec.full.cpu().numpy(), res.components, res.eigenvalues, res.latents,
                         res.latent_std, resolution_A=mean_res, movie_frames=params["movie_frames"],
                         batch_size=params["batch_size"],
                         mean_label="mean map X_0 (half-set backprojection, Wiener-filtered from its FSC)",
                         info={"work_box": res.work_box, "resolution_A": res.resolution_A, "basis": res.basis_size,
                               "n_particles": len(pset), "cg_steps": res.iterations})
    star = write_fsc_star(out / "mean_fsc.star", rec.box, rec.apix, rec.fsc, rec.fsc_masked)
    ctx.add("fsc", star, "half-map FSC of the mean map", resolution_A=mean_res)
    ctx.add("plot", plot_fsc(out / "mean_fsc.png", rec.box, rec.apix, {"unmasked": rec.fsc}), "mean map FSC")
    write_map(out / "mean_basis.mrc", res.mean_basis, pset.apix)
    ctx.add("volume", "mean_basis.mrc", "least-squares mean in the covariance's basis (band-limited)",
            resolution_A=res.resolution_A)

    lines = [f"# method of moments: {len(pset)} particles, K = {K}", "",
             f"- working box {res.work_box} px, resolution limit {res.resolution_A:.2f} Å, {res.basis_size} basis "
             f"functions, white noise variance {res.noise_var:.4g} (transforms of the working box, from the corners)",
             f"- conjugate gradient: {res.iterations} steps, relative residual {res.last_change:.2e} "
             f"({'below' if res.converged else '**not below**'} --tol {res.tol:.1e})",
             f"- mean map: resolution at half-map FSC 0.143 {mean_res:.2f} Å",
             f"- eigenvalue shrinkage of the right-hand side: {params['shrinkage']}",
             f"- top eigenvalues of the covariance: {np.array2string(res.spectrum[:2 * K + 2], precision=4)} "
             "(those of noise form a flat floor)",
             "", *eigenvalue_table(res.eigenvalues, res.latents, res.latent_std)]
    ctx.write_report(lines, "method of moments: eigenvalues and settings")


def run_uniform(params: dict[str, Any], pset: Any, ctx: Any) -> None:
    """--poses uniform: the map (and low-rank model) from the three invariant moments."""
    import json

    import numpy as np

    from cryohet.inference.moments_unknown_poses import fit_uniform_poses
    from cryohet.io.mrc import write_map

    K = params["uniform_components"]
    res = fit_uniform_poses(pset, resolution_A=params["resolution_A"], diameter_A=params["diameter_A"],
                            n_components=K, quadrature_deg=params["quadrature_deg"], n_starts=params["n_starts"],
                            iters=params["fit_iter"], defocus_groups=params["defocus_groups"],
                            batch_size=params["batch_size"], device=ctx.device,
                            seed=params["seed"], log=ctx.log, progress=ctx.progress,
                            checkpoint=Path(ctx.out_dir) / "checkpoint.safetensors", resume=params["resume"])
    out = Path(ctx.out_dir)
    write_map(out / "map.mrc", res.volume, pset.apix)
    ctx.add("volume", "map.mrc", "map from the first three moments (poses uniform; orientation and hand arbitrary)",
            resolution_A=res.resolution_A)
    if K > 0:
        write_map(out / "mean.mrc", res.low_rank_mean, pset.apix)
        ctx.add("volume", "mean.mrc", "mean μ of the low-rank model (orientation and hand arbitrary)",
                resolution_A=res.resolution_A)
        for k in range(K):
            write_map(out / f"component_{k + 1:02d}.mrc", res.components[k], pset.apix)
            ctx.add("volume", f"component_{k + 1:02d}.mrc", f"principal volume {k + 1} of the low-rank model "
                    f"(unit norm, variance {res.variances[k]:.4g})", resolution_A=res.resolution_A)
    summary = {"poses": "uniform", "n_particles": res.data.n, "work_box": res.work_box,
               "resolution_A": res.resolution_A, "basis": res.basis_size, "features": res.n_features,
               "quadrature_rotations": res.n_rotations, "noise_var": res.noise_var,
               "relative_residuals": list(res.residuals),
               "low_rank_relative_residuals": list(res.low_rank_residuals or []),
               "variances": res.variances.tolist(), "history": res.history}
    ctx.write_report(json.dumps(summary, indent=1), "moments with uniform poses: settings, residuals, fit history",
                     name="moments_fit.json")
    lines = [f"# method of moments, poses uniform: {res.data.n} particles", "",
             f"- working box {res.work_box} px, resolution limit {res.resolution_A:.2f} Å, {res.basis_size} basis "
             f"functions, {res.n_features} steerable features, {res.n_rotations} quadrature directions, white noise "
             f"variance {res.noise_var:.4g} (corners)",
             "- relative residuals of the first, second, third moments: "
             f"{np.array2string(np.array(res.residuals), precision=3)}",
             "- the map's orientation and hand are arbitrary: the moments of projections under uniform rotations "
             "are those of every rotated or mirrored copy"]
    if K > 0:
        lines.append(f"- low-rank model, K = {K}: residuals "
                     f"{np.array2string(np.array(res.low_rank_residuals), precision=3)}, variances "
                     f"{np.array2string(res.variances, precision=4)}")
    ctx.write_report(lines, "method of moments (uniform poses): residuals and settings")


METHOD = Method(
    name="moments",
    order=31,
    title="Mean and covariance of the volumes from the images' moments (poses known), or a map from three "
          "moments (poses uniform)",
    help="The method of moments of Katsevich-Singer and Andén-Singer (survey section 8): no latent is inferred "
         "while the model is fitted. The mean is a CTF-corrected least-squares reconstruction and the covariance "
         "of the 3-D volumes solves the normal equations of the images' second moments (CTF included, white "
         "noise variance from the images' corners; the spectrum of their right-hand side shrunk, --shrinkage) by "
         "preconditioned conjugate gradient, in a basis of "
         "band-limited functions concentrated in a ball (--resolution_A, --diameter_A); particles are streamed "
         "in batches at every pass. Its top eigenvectors are the principal volumes, its eigenvalues their "
         "variances; each particle's coordinates are their Wiener estimates from its image. Writes the mean map "
         "(half-set backprojection with FSC), the principal volumes, latents.npy and latents_std.npy, the "
         "particles STAR with cryohetZ1..K and goodness of fit, movies X_0 + τ X_k with ChimeraX scripts, the "
         "linear model (for analyze, eval-volume, benchmark-score), the covariance's spectrum, a plot and a report. "
         "The CG state (poses known), the moments' sums and the fits' finished starts (poses uniform) are "
         "checkpointed: --resume yes continues after a crash or kill. "
         "With --poses uniform (Kam; Sharon et al.) the poses are unknown: the images' in-plane-invariant first, "
         "second and third moments in a steerable polar Fourier basis (one streaming pass, debiased for white "
         "noise, images phase-flipped, per defocus group) are fitted by the moments of a band-limited map's "
         "projections over a quadrature of projection directions (L-BFGS, random starts, frequency marching), and "
         "optionally a low-rank model μ + Σ z_k W_k; writes map.mrc (orientation and hand arbitrary), the "
         "low-rank mean and principal volumes, the fit's residuals and a report.",
    params=PARAMS,
    outputs=("model", "volume", "latents", "particles_star", "volume_series", "chimerax", "plot", "report", "fsc"),
    run=run,
    citations=(
        "Katsevich, Katsevich & Singer (2015) Covariance matrix estimation for the cryo-EM heterogeneity problem. "
        "SIAM J. Imaging Sci. 8, 126-185.",
        "Andén, Katsevich & Singer (2015) Covariance estimation using conjugate gradient for 3D classification in "
        "cryo-EM. Proc. IEEE ISBI, 200-204.",
        "Andén & Singer (2018) Structural variability from noisy tomographic projections. SIAM J. Imaging "
        "Sci. 11, 1441-1492.",
        "Donoho, Gavish & Johnstone (2018) Optimal shrinkage of eigenvalues in the spiked covariance model. Ann. "
        "Statist. 46, 1742-1778.",
        "Kam (1980) The reconstruction of structure from electron micrographs of randomly oriented particles. "
        "J. Theor. Biol. 82, 15-39.",
        "Sharon, Kileel, Khoo, Landa & Singer (2020) Method of moments for 3D single particle ab initio modeling "
        "with non-uniform distribution of viewpoints. Inverse Problems 36, 044003.",
    ),
)
