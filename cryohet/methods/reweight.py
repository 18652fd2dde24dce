"""MD-ensemble reweighting: populations of a trajectory's frames from particle images with known poses and CTF."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path, save_npy
from cryohet.methods.base import DATADIR, Method, Param

#: The choices of --scale and --cv, and the default selection (``cryohet.io.trajectory.HEAVY``). The engine's modules
#: are imported when the method runs: MDAnalysis and torch would add about 2 s to every cryohet command's start.
SCALES = ("global", "per_image")
CV_KINDS = ("frame", "file", "rmsd", "distance")
HEAVY = "heavy"

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF (from a consensus refinement): RELION STAR or "
          "cryoSPARC .cs.", required=True, input_role="particles"),
    Param("trajectory", Path, None, "Frames of the ensemble, aligned to the consensus map (coordinates in Å in the "
          "map's frame, map origin 0): DCD, XTC (or any MDAnalysis trajectory format) with --topology, or a "
          "multi-model PDB/mmCIF.", required=True),
    Param("topology", Path, None, "Topology of the trajectory (PDB, GRO, PSF, ... with the same atoms in the same "
          "order); needed for DCD/XTC.", input_role="atomic_model"),
    Param("selection", str, HEAVY, "Atoms rendered: an MDAnalysis selection string (e.g. 'protein and not name "
          "H*'), or 'heavy' (every atom but hydrogens and waters)."),
    Param("stride", int, 1, "Use every stride-th frame of the trajectory.", min=1),
    Param("resolution_A", float, 8.0, "Resolution (Å) at which the frames are rendered and up to which the images "
          "are scored (the images are Fourier-cropped to it).", min=0.1),
    Param("scale", str, "global", "Amplitude of the images against the rendered frames: 'global' (one value "
          "fitted to the data) or 'per_image' (fitted in closed form for each image and frame).", choices=SCALES),
    Param("cv", str, "frame", "Collective variable of the free-energy profile: frame (frame number), file "
          "(--cv_file), rmsd (to --cv_reference_frame, Å) or distance (between the centres of mass of "
          "--cv_selection1 and --cv_selection2, Å).", choices=CV_KINDS),
    Param("cv_file", Path, None, "Per-frame CV values: .npy or text, one number a line, one per trajectory frame "
          "or one per kept frame."),
    Param("cv_reference_frame", int, 1, "With --cv rmsd: the reference (1-based, among the kept frames).", min=1),
    Param("cv_selection1", str, "", "With --cv distance: first MDAnalysis selection."),
    Param("cv_selection2", str, "", "With --cv distance: second MDAnalysis selection."),
    Param("cv_bins", int, 20, "Bins of the free-energy profile over the CV's range (0: one per distinct value; "
          "always one per frame for --cv frame).", min=0),
    Param("temperature_K", float, 300.0, "Temperature (K) for the free energy in kcal/mol.", min=1e-3),
    Param("prior_alpha", float, 1.0, "Dirichlet prior concentration of the populations (1: uniform on the "
          "simplex).", min=1e-6, expert=True),
    Param("mcmc_samples", int, 1000, "Posterior samples of the populations (Gibbs sweeps kept).", min=10),
    Param("burn_in", int, 200, "Gibbs sweeps discarded before the samples.", min=0, expert=True),
    Param("em_iterations", int, 2000, "Most EM passes over the likelihood matrix for the maximum-likelihood "
          "populations (SQUAREM-accelerated EM; it stops when an EM step raises the log-likelihood of all the "
          "images by under 0.001 nats).",
          min=3, expert=True),
    Param("n_maps", int, 5, "Maps (and models) written of the most populated frames.", min=0),
    Param("noise_particles", int, 2000, "Particles the noise spectrum and scale are estimated from.", min=10,
          expert=True),
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
    Param("chunk_particles", int, 8192, "Particles scored between checkpoints of the likelihood pass.", min=1,
          expert=True),
    Param("resume", bool, False, "Continue the likelihood pass of the run in this folder from its checkpoint "
          "(loglik.checkpoint.json)."),
    DATADIR,
)


def _cv(params: dict[str, Any], traj: Any) -> tuple[np.ndarray, str]:
    """The per-frame CV of ``traj`` (a ``cryohet.io.trajectory.Trajectory``) and its name."""
    from cryohet.analysis.collective import com_distance, cv_from_file, frame_number, rmsd_to_frame

    kind = params["cv"]
    if kind != "file" and params["cv_file"] is not None:
        raise ValueError("--cv_file is given but --cv is not 'file'")
    if kind == "file":
        if params["cv_file"] is None:
            raise ValueError("--cv file needs --cv_file")
        return cv_from_file(params["cv_file"], traj), Path(params["cv_file"]).stem
    if kind == "rmsd":
        return rmsd_to_frame(traj, params["cv_reference_frame"]), \
            f"RMSD to frame {traj.frames[params['cv_reference_frame'] - 1] + 1} (Å)"
    if kind == "distance":
        return com_distance(traj, params["cv_selection1"], params["cv_selection2"]), "distance (Å)"
    return frame_number(traj), "frame"


def _settings(params: dict[str, Any]) -> dict[str, Any]:
    """What the log-likelihood matrix depends on (a resumed pass must match)."""
    files = {k: params[k] for k in ("particles", "trajectory", "topology") if params[k] is not None}
    return {"files": {k: [str(Path(v).resolve()), Path(v).stat().st_size] for k, v in files.items()},
            **{k: params[k] for k in ("selection", "stride", "resolution_A", "batch_size")}}


def _write_populations(path: Path, frames: np.ndarray, cv: np.ndarray, samples: np.ndarray, ml: np.ndarray,
                       hard: np.ndarray) -> None:
    """population: posterior mean; sd and 2.5/97.5 % quantiles of the posterior; ml: EM; hard_assignment."""
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["frame", "cv", "population", "sd", "q2.5", "q97.5", "ml", "hard_assignment"])
        for f in range(samples.shape[1]):
            out.writerow([int(frames[f]) + 1, f"{cv[f]:.6g}", f"{samples[:, f].mean():.6g}",
                          f"{samples[:, f].std():.4g}", f"{lo[f]:.6g}", f"{hi[f]:.6g}", f"{ml[f]:.6g}",
                          f"{hard[f]:.6g}"])


def _report(summary: dict[str, Any], frames: np.ndarray, w: np.ndarray, samples: np.ndarray) -> str:
    """The Markdown report: settings, EM and posterior summaries, the 20 most populated frames."""
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    order = np.argsort(-w)
    lines = ["# Ensemble reweighting", "",
             f"{summary['n_particles']} particles, {summary['n_frames']} frames of {summary['trajectory']} "
             f"({summary['n_atoms']} atoms, selection `{summary['selection']}`), scored to "
             f"{summary['resolution_A']:g} Å on a {summary['lattice_box']}-pixel lattice; amplitude "
             f"{summary['scale']} ({summary['scale_value']:.4g}).", "",
             f"EM: {summary['em_iterations']} passes (last step's log-likelihood gain {summary['em_change']:.2g} "
             f"nats); posterior: {samples.shape[0]} Gibbs samples, Dirichlet({summary['prior_alpha']:g}) prior.", "",
             f"Mean probability of each particle's top frame: {summary['mean_top_probability']:.3f}; effective "
             f"number of frames (exp entropy of the populations): {summary['effective_frames']:.2f}.", "",
             "| frame | population (posterior mean) | 95 % credible interval | maximum likelihood (EM) |",
             "|---:|---:|---|---:|"]
    ml = summary["ml"]
    lines += [f"| {frames[f] + 1} | {w[f]:.4f} | {lo[f]:.4f} – {hi[f]:.4f} | {ml[f]:.4f} |" for f in order[:20]]
    if len(order) > 20:
        lines.append(f"| ... | ({len(order) - 20} more in populations.csv) | | |")
    lines += ["", "Files: populations.csv, loglik.npy (N × F log-likelihoods, particles-file order), "
              "free_energy.csv, free_energy.png, particles.star (cryohetReweightFrame, "
              "cryohetReweightFrameProbability, cryohetReweightCV), latents.npy and latents_std.npy (posterior "
              "mean and s.d. of the CV per particle), frame_*.mrc, top_frames.pdb (.cif from mmCIF), summary.json.", ""]
    return "\n".join(lines)


def run(params: dict[str, Any], ctx) -> None:
    from cryohet.analysis.free_energy import free_energy_profile, plot_profile, write_profile_csv
    from cryohet.inference.frame_likelihood import FrameScorer, frame_maps, loglik_matrix, working_lattice
    from cryohet.inference.populations import em_weights, frame_posteriors, gibbs_weights, hard_assignment
    from cryohet.io.atomic_model import model_suffix, write_models
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.io.trajectory import check_frames_in_box, read_trajectory

    if params["burn_in"] < 0:
        raise ValueError("--burn_in must be non-negative")
    pset = load_particles(params["particles"], datadir=params["datadir"])
    traj = read_trajectory(params["trajectory"], params["topology"], params["selection"], params["stride"])
    check_frames_in_box(traj, pset.box, pset.apix)
    cv, cv_name = _cv(params, traj)
    out, dev, F = ctx.out_dir, ctx.device, len(traj)
    lattice, radius_px = working_lattice(pset.box, pset.apix, params["resolution_A"])
    ctx.log.info("%d particles (box %d, %.3f Å/px), %d frames of %d atoms; scored to %.2f Å on a %d-pixel lattice",
                 len(pset), pset.box, pset.apix, F, traj.xyz_A.shape[1], params["resolution_A"], lattice.box)
    maps = frame_maps(traj.xyz_A, traj.weight, pset.box, pset.apix, params["resolution_A"], lattice.box, dev)
    scorer = FrameScorer(maps, lattice.half_plane(radius_px))
    del maps
    ll, noise = loglik_matrix(pset, scorer, lattice, out / "loglik.npy", per_image=params["scale"] == "per_image",
                              noise_particles=params["noise_particles"], batch_size=params["batch_size"],
                              chunk_particles=params["chunk_particles"], settings=_settings(params),
                              resume=params["resume"], device=dev, log=ctx.log, progress=ctx.progress)
    ml, iters, change = em_weights(ll, params["em_iterations"], device=dev)
    ctx.report_convergence("EM populations (log-likelihood gain of an EM step, nats)", change < 1e-3, change, 1e-3,
                           iters)
    samples = gibbs_weights(ll, ml, params["mcmc_samples"], params["burn_in"], params["prior_alpha"], ctx.seed,
                            device=dev)
    w = samples.mean(0)  # the populations reported: the posterior mean (see inference.populations)
    hard = hard_assignment(ll)
    top, prob, expected, spread = frame_posteriors(ll, w, cv, device=dev)
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    _write_populations(out / "populations.csv", traj.frames, cv, samples, ml, hard)
    prof = free_energy_profile(cv, w, samples, 0 if params["cv"] == "frame" else params["cv_bins"])
    write_profile_csv(out / "free_energy.csv", prof, cv_name, params["temperature_K"])
    plot_profile(out / "free_energy.png", prof, cv_name, cv, w, lo, hi)
    write_particles_star(out / "particles.star", pset, extra_columns={
        "cryohetReweightFrame": traj.frames[top] + 1, "cryohetReweightFrameProbability": prob,
        "cryohetReweightCV": expected})
    for name, values in (("latents.npy", expected), ("latents_std.npy", spread)):
        save_npy(out / name, values[:, None].astype(np.float32))
    best = np.argsort(-w)[:params["n_maps"]]
    suffix = model_suffix(traj.source, traj.xyz_A.shape[1])
    if len(best):
        full = frame_maps(traj.xyz_A[best], traj.weight, pset.box, pset.apix, params["resolution_A"], device=dev)
        for rank, f in enumerate(best):
            write_map(out / f"frame_{traj.frames[f] + 1:05d}.mrc", full[rank].cpu().numpy(), pset.apix)
        write_models(out / f"top_frames{suffix}", traj.as_atoms(0), traj.xyz_A[best])
    p = np.clip(w, 1e-300, None)
    summary = {"n_particles": len(pset), "n_frames": F, "trajectory": str(traj.source),
               "n_atoms": int(traj.xyz_A.shape[1]), "selection": params["selection"],
               "resolution_A": params["resolution_A"], "lattice_box": lattice.box, "scale": params["scale"],
               "scale_value": noise.scale, "em_iterations": iters, "em_change": change,
               "prior_alpha": params["prior_alpha"], "mean_top_probability": float(prob.mean()),
               "effective_frames": float(np.exp(-(p * np.log(p)).sum())), "frames": (traj.frames + 1).tolist(),
               "populations": w.tolist(), "ml": ml.tolist(), "sd": samples.std(0).tolist(), "q2.5": lo.tolist(),
               "q97.5": hi.tolist(),
               "hard_assignment": hard.tolist(), "noise_var_per_shell": noise.noise_var, "cv": cv.tolist(),
               "cv_name": cv_name}
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    ctx.log.info("populations (frame: ML [95 %% CI]): %s", "; ".join(
        f"{traj.frames[f] + 1}: {w[f]:.3f} [{lo[f]:.3f}, {hi[f]:.3f}]" for f in np.argsort(-w)[:10]))
    ctx.write_report(_report(summary, traj.frames, w, samples),
                     "ensemble reweighting report (populations, credible intervals)",
                     populations="populations.csv", summary="summary.json", loglik="loglik.npy")
    ctx.add("plot", "free_energy.png", f"populations and free energy along {cv_name}", table="free_energy.csv")
    ctx.add("particles_star", "particles.star", "particles with their most probable frame", n=len(pset))
    ctx.add("latents", "latents.npy", f"expected {cv_name} per particle (posterior mean over the frames)",
            cv=cv_name, std="latents_std.npy")
    for rank, f in enumerate(best):
        ctx.add("volume_series", f"frame_{traj.frames[f] + 1:05d}.mrc", f"frame {traj.frames[f] + 1} "
                f"(population {w[f]:.3f})", series="top_frames", index=rank, apix=pset.apix,
                frame=int(traj.frames[f] + 1), population=float(w[f]))
    if len(best):
        ctx.add("atomic_model", f"top_frames{suffix}", "the most populated frames, most populated first",
                frames=[int(traj.frames[f] + 1) for f in best])


METHOD = Method(
    name="reweight",
    order=60,
    title="MD-ensemble reweighting: frame populations and free energy from particle images",
    help="Likelihood of every particle image under every frame of a trajectory aligned to the consensus map "
         "(frames rendered at --resolution_A, projected at each particle's pose with its CTF, Gaussian noise per "
         "frequency shell estimated from the data), maximum-likelihood populations by EM, their posterior by "
         "Gibbs sampling (Dirichlet prior; the populations reported are its means, with s.d. and 95 % credible "
         "intervals), the most probable frame of each "
         "particle, and the free energy −kT ln p along the frame order or a collective variable (a file, RMSD to "
         "a frame, or a distance between two selections). Writes populations.csv, loglik.npy, free_energy.csv, "
         "free_energy.png, particles.star, latents.npy, report.md, summary.json, maps and models of the most "
         "populated frames.",
    params=PARAMS,
    outputs=("report", "plot", "particles_star", "latents", "volume_series", "atomic_model"),
    run=run,
    citations=("Tang WS, Silva-Sánchez D, Giraldo-Barreto J, Carpenter B, Hanson SM, Barnett AH, Thiede EH, "
               "Cossio P (2023) Ensemble reweighting using cryo-EM particle images. J Phys Chem B 127:5410-5421.",
               "Michaud-Agrawal N, Denning EJ, Woolf TB, Beckstein O (2011) MDAnalysis: a toolkit for the analysis "
               "of molecular dynamics simulations. J Comput Chem 32:2319-2327."),
)
