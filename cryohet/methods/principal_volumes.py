"""``cryohet principal-volumes``: mean and K principal volumes from the images, poses and CTF known (survey §5)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cryohet.methods._pose_outputs import SEARCH_PARAMS
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
          "the newest is damaged; with --refine_poses also the poses after each re-search, pose_state.safetensors, and "
          "each later fit's checkpoint_poses<r>.safetensors); --max_iter is the new total. The other settings must "
          "be the same."),
    *SEARCH_PARAMS,
)


def _convergence_line(converged: bool, last_change: float, tol: float, iterations: int) -> str:
    """The report's line on whether EM met --tol (changes: sines of the largest principal angle between
    successive component subspaces)."""
    if converged:
        return f"- converged: last subspace change (sine) {last_change:.2e} below --tol {tol:.2e}"
    return (f"- **did not converge**: EM stopped at the iteration limit (--max_iter) after {iterations} iterations "
            f"with a last subspace change (sine) of {last_change:.2e} against --tol {tol:.2e}; run more iterations "
            "(--resume yes with a larger --max_iter continues from the checkpoint) or loosen --tol")


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.inference.decoder_poses import ResearchSettings
    from cryohet.inference.ppca import check_inputs, fit_principal_volumes
    from cryohet.inference.ppca_poses import fit_principal_volumes_posed
    from cryohet.io.mrc import read_mask
    from cryohet.io.particles import load_particles
    from cryohet.methods._linear_outputs import eigenvalue_table, write_linear_outputs
    from cryohet.methods._pose_outputs import SearchedPoses, pose_columns, write_pose_changes
    from cryohet.reconstruct.fsc import resolution_at

    pset = load_particles(params["particles"], params["datadir"] or None)
    K = params["n_components"]
    mask = read_mask(params["mask"], pset.box, pset.apix) if params["mask"] else None
    check_inputs(len(pset), pset.box, pset.apix, K, params["resolution_A"], mask, params["particles"],
                 params["mask"] or None)
    options = dict(n_components=K, resolution_A=params["resolution_A"], mask=mask, max_iter=params["max_iter"],
                   tol=params["tol"], batch_size=params["batch_size"], pad=params["pad"],
                   regularisation=params["regularisation"], prior=params["prior"], seed=params["seed"],
                   cache_mb=params["cache_mb"], progress=ctx.progress)
    poses = None
    if params["refine_poses"]:
        search = ResearchSettings(max_angle_deg=params["pose_max_deg"], max_shift_A=params["pose_max_A"])
        res, state = fit_principal_volumes_posed(pset, params["pose_rounds"], search, ctx.out_dir, options,
                                                 ctx.device, resume=params["resume"], log=ctx.log,
                                                 track=ctx.progress)
        refined = dataclasses.replace(pset, euler_deg=state.euler_deg, shift_A=state.shift_A)
        poses, pset = SearchedPoses.between(pset, refined), refined
    else:
        res = fit_principal_volumes(pset, log=ctx.log, device=ctx.device, resume=params["resume"],
                                    checkpoint=Path(ctx.out_dir) / "checkpoint.safetensors", **options)
    ctx.report_convergence("principal-volumes EM (subspace change, sine)", res.converged, res.last_change, res.tol,
                           res.iterations)
    mean_res = resolution_at(res.mean_fsc, pset.box, pset.apix, 0.143)
    write_linear_outputs(ctx, pset, res.mean, res.components, res.eigenvalues, res.latents, res.latent_std,
                         resolution_A=mean_res, mean_label="mean map X_0 (homogeneous reconstruction)",
                         component_resolution_A=res.component_resolution_A, movie_frames=params["movie_frames"],
                         batch_size=params["batch_size"],
                         info={"work_box": res.work_box, "resolution_A": res.resolution_A,
                               "n_particles": len(pset), "iterations": len(res.history)},
                         refined_pose_columns=pose_columns(pset) if poses is not None else None)
    if poses is not None:
        write_pose_changes(ctx, poses)

    lines = [f"# principal volumes: {len(pset)} particles, K = {K}", "",
             f"- working box {res.work_box} px, resolution limit {res.resolution_A:.2f} Å, "
             f"{res.iterations} EM iterations",
             _convergence_line(res.converged, res.last_change, res.tol, res.iterations),
             f"- mean X_0: the homogeneous reconstruction of the particles (half-sets, plain division, weighted per "
             f"shell by their FSC), half-map FSC 0.143 at {mean_res:.2f} Å",
             "- each principal volume is fitted in the two half-sets with the same coordinates and weighted per "
             "shell by their FSC (√(2 FSC / (1 + FSC))): it holds no detail beyond what both halves agree on",
             "", *eigenvalue_table(res.eigenvalues, res.latents, res.latent_std, res.component_resolution_A),
             "", "Every run returns K components, a homogeneous set too (they then fit noise). Whether they are real: "
             "`cryohet validate-halfsets --method principal-volumes --particles <the same particles> "
             f"--method_params \"n_components={K} resolution_A={params['resolution_A']:g}\"` "
             "(flagged when the halves disagree)."]
    ctx.write_report(lines, "principal volumes: eigenvalues and settings")


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
