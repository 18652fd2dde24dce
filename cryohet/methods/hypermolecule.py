"""``cryohet hypermolecule``: the basis-function hyper-molecule V(τ, k) = Σ a_jl B_j(k) P_l(τ) with each particle's τ
sampled by MCMC (survey section 7.1; poses known)."""
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
    Param("degree", int, 3, "Degree of the Legendre polynomials in τ (degree + 1 coefficient maps; 1: linear in τ).",
          min=1, max=12),
    Param("resolution_A", float, 10.0, "Band limit of the 3-D basis, Å: images are Fourier-cropped to it (0: "
          "Nyquist of the particles).", min=0.0),
    Param("iterations", int, 20, "Most Monte Carlo EM iterations (passes over the particles).", min=1),
    Param("warmup", int, 5, "First iterations fitted at degree 1 with τ re-scaled to fill [-1, 1] after each.",
          min=0, expert=True),
    Param("tol", float, 1e-3, "Stop when the relative change of the coefficient maps in an iteration is below this.",
          min=0.0, expert=True),
    Param("regularisation", float, 1.0, "Prior strength T of the per-shell prior 1/(T τ²) on the coefficient maps "
          "(as principal-volumes; larger trusts the data more).", min=1e-6, expert=True),
    Param("smoothness", float, 1.0, "Extra prior precision of the degree-l maps (l ≥ 2), 1 + smoothness·((l(l+1)/2)² "
          "− 1) times the degree-1 map's: larger keeps the path V(τ) straighter (0: the same prior for all).",
          min=0.0, expert=True),
    Param("n_steps", int, 40, "Metropolis steps per particle per EM iteration.", min=1, expert=True),
    Param("n_chains", int, 4, "Chains per particle in the final posterior pass (the stored chain and random "
          "starts).", min=1, max=64, expert=True),
    Param("burn_in", int, 100, "Burn-in steps per chain in the final pass.", min=0, expert=True),
    Param("final_steps", int, 200, "Recorded steps per chain in the final pass.", min=2, expert=True),
    Param("n_keep", int, 16, "Posterior samples of τ stored per particle (tau_samples.npy).", min=1, max=1000,
          expert=True),
    Param("jump_prob", float, 0.1, "Probability of an independent uniform proposal (crosses between modes) instead "
          "of a random-walk step, in the final posterior pass (the EM passes use the random walk only).", min=0.0,
          max=1.0, expert=True),
    Param("n_frames", int, 11, "Maps along τ from -1 to 1.", min=2, max=200),
    Param("batch_size", int, 256, "Particles per batch (memory ~ batch_size × box² × (degree+2) × 8 bytes).",
          min=1, expert=True),
    Param("cache_mb", float, 1024.0, "Keep the Fourier-cropped images in memory when they fit in this many MiB "
          "(else they are read again at each iteration).", min=0.0, expert=True),
    Param("max_memory_gb", float, 8.0, "Refuse a basis whose M-step needs more than this many GiB.", min=0.01,
          expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (written after every "
          "iteration) and its chains' state; --iterations is the new total. The other settings must be the same."),
)


def _plot(path: Path, post: np.ndarray, history: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    fig = Figure(figsize=(12, 3.5), layout="constrained")
    ax = fig.subplots(1, 3)
    ax[0].hist(post[:, 0], bins=60, range=(-1, 1), color="C0")
    ax[0].set(xlabel="posterior mean of τ", ylabel="particles", title="τ")
    ax[1].hexbin(post[:, 0], post[:, 1], gridsize=40, bins="log", mincnt=1)
    ax[1].set(xlabel="posterior mean of τ", ylabel="posterior s.d. of τ", title="uncertainty")
    it = [h["iteration"] for h in history]
    ax[2].semilogy(it, [max(h["map_change"], 1e-12) for h in history], "o-", label="map change")
    ax[2].set(xlabel="EM iteration", ylabel="relative change of the maps", title="convergence")
    save_png(fig, path, dpi=90)


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.analysis.volumes import write_chimerax_script, write_volume_series
    from cryohet.atomic import save_npy
    from cryohet.inference.hypermol_mcmc import MCMCOptions, fit_hypermolecule
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._fit_outputs import fit_columns
    from cryohet.models.hypermolecule import HyperMolecule, legendre_basis
    from cryohet.validation.goodness import maps_predictor

    pset = load_particles(params["particles"], params["datadir"] or None)
    out = Path(ctx.out_dir)
    mcmc = MCMCOptions(n_steps=params["n_steps"], n_chains=params["n_chains"], burn_in=params["burn_in"],
                       final_steps=params["final_steps"], n_keep=params["n_keep"], jump_prob=params["jump_prob"])
    res = fit_hypermolecule(pset, params["degree"], resolution_A=params["resolution_A"],
                            iterations=params["iterations"], warmup=params["warmup"], tol=params["tol"],
                            regularisation=params["regularisation"], smoothness=params["smoothness"], mcmc=mcmc,
                            out_dir=out, batch_size=params["batch_size"], device=ctx.device, seed=params["seed"],
                            cache_mb=params["cache_mb"], max_memory_gb=params["max_memory_gb"],
                            progress=ctx.progress, log=ctx.log, resume=params["resume"])
    ctx.report_convergence("hyper-molecule Monte Carlo EM (relative map change)", res.converged, res.last_change,
                           res.tol, len(res.history))
    model = HyperMolecule(res.maps, pset.box, pset.apix, res.resolution_A,
                          info={"work_box": res.work_box, "n_particles": len(pset)})
    model.save(out / "hypermolecule.safetensors")
    ctx.add("model", "hypermolecule.safetensors", f"hyper-molecule: {model.degree + 1} Legendre coefficient maps",
            model_type="hypermolecule", latent_dim=1, box=pset.box, apix=pset.apix, degree=model.degree,
            resolution_A=res.resolution_A)

    post = np.load(out / "tau_posterior.npy", mmap_mode="r")
    save_npy(out / "z.npy", np.asarray(post[:, :1]))
    save_npy(out / "z_sd.npy", np.asarray(post[:, 1:2]))
    save_npy(out / "z_interval.npy", np.asarray(post[:, 2:4]))
    ctx.add("latents", "z.npy", "posterior mean of τ (N, 1)", dim=1, std="z_sd.npy", interval="z_interval.npy",
            samples="tau_samples.npy")
    ctx.add("latents", "tau_samples.npy", f"posterior samples of τ (N, {params['n_keep']})", dim=1,
            samples_per_particle=params["n_keep"])
    ctx.add("latents", "tau_posterior.npy", "posterior of τ per particle: mean, s.d., 5 % and 95 % quantiles (N, 4)",
            dim=1, columns=["mean", "sd", "q05", "q95"])

    z = np.asarray(post[:, 0], dtype=np.float64)
    coef = legendre_basis(torch.as_tensor(z), model.degree).numpy()
    maps = torch.as_tensor(res.maps, device=ctx.device)
    cols = {"cryohetZ1": z, "cryohetStdZ1": np.asarray(post[:, 1], np.float64),
            "cryohetZ1Low": np.asarray(post[:, 2], np.float64), "cryohetZ1High": np.asarray(post[:, 3], np.float64)}
    cols.update(fit_columns(ctx, pset, maps_predictor(maps, coef), maps_predictor(maps[:1]), box=res.work_box,
                            batch_size=params["batch_size"]))
    write_particles_star(out / "particles.star", pset, extra_columns=cols)
    ctx.add("particles_star", "particles.star", "particles with cryohetZ1 (posterior mean of τ), its s.d. "
            "cryohetStdZ1 and 90 % interval (cryohetZ1Low, cryohetZ1High), goodness of fit (cryohetFitZ, "
            "cryohetResidualZ)", columns=["cryohetZ1"])

    taus = np.linspace(-1, 1, params["n_frames"])
    series = write_volume_series(model, taus[:, None], out / "maps_along_tau", prefix="tau", progress=ctx.progress,
                                 desc="maps along τ")
    series.register(ctx, "tau", "map along τ", per_map={"tau": [float(t) for t in taus]})
    cxc = write_chimerax_script(out / "maps_along_tau.cxc", series.files, series.level, title="V(τ), τ from -1 to 1")
    ctx.add("chimerax", cxc, "ChimeraX: the maps along τ")
    _plot(out / "tau.png", np.asarray(post), res.history)
    ctx.add("plot", "tau.png", "posterior means and s.d. of τ, EM convergence")

    sd = np.asarray(post[:, 1])
    lines = [f"# hyper-molecule: {len(pset)} particles, degree {model.degree} in τ", "",
             f"- working box {res.work_box} px ({res.work_apix:.3f} Å/px), band limit {res.resolution_A:.2f} Å, "
             f"{len(res.history)} Monte Carlo EM iterations, "
             + ("converged" if res.converged else f"stopped at --iterations (last map change {res.last_change:.2e})"),
             f"- final pass: {params['n_chains']} chains × {params['final_steps']} steps per particle after "
             f"{params['burn_in']} burn-in, Metropolis acceptance {res.acceptance:.2f}",
             f"- posterior s.d. of τ: median {np.median(sd):.3f}, 90th percentile {np.percentile(sd, 90):.3f}; "
             f"mean 90 % interval width {np.mean(post[:, 3] - post[:, 2]):.3f}"]
    ctx.write_report(lines, "hyper-molecule: settings, convergence, posterior widths")


METHOD = Method(
    name="hypermolecule",
    order=41,
    title="Basis-function hyper-molecule with τ sampled by MCMC (poses known)",
    help="Fits the hyper-molecule of survey section 7.1, V(τ, k) = Σ_jl a_jl B_j(k) P_l(τ): a band-limited 3-D "
         "Fourier basis on the grid cropped to --resolution_A (slices are one interpolation pass per coefficient "
         "map) times orthonormal Legendre polynomials of τ in [-1, 1] (--degree). The shared coefficients are "
         "solved by per-voxel least squares over the samples (Monte Carlo EM) while each particle's τ is sampled "
         "by batched Metropolis-within-Gibbs (random walk plus uniform jumps; the likelihood of τ is a quadratic "
         "in the Legendre values, so steps are cheap). Writes the coefficient maps (hypermolecule.safetensors, for "
         "analyze / eval-volume / benchmark-score), the posterior of τ per particle (z.npy: mean; z_sd.npy; "
         "z_interval.npy: 90 % interval; tau_samples.npy: samples; memory-mapped while sampled), the particles "
         "STAR with cryohetZ1, cryohetStdZ1, cryohetZ1Low/High and the goodness of fit, maps along τ with a "
         "ChimeraX script, a plot and a report. A checkpoint is written after every iteration: --resume yes "
         "continues after a crash or kill.",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "volume_series", "chimerax", "plot", "report"),
    run=run,
    citations=(
        "Lederman & Singer (2017) Continuously heterogeneous hyper-objects in cryo-EM and 3-D movies of many "
        "temporal dimensions. arXiv:1704.02899.",
        "Lederman, Andén & Singer (2020) Hyper-molecules: on the representation and recovery of dynamical "
        "structures for applications in flexible macro-molecules in cryo-EM. Inverse Problems 36, 044005.",
    ),
)
