"""``cryohet abinit``: a map and every particle's pose from images with CTF and no poses (cryoDRGN2 / RELION class)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import DATADIR, Method, Param

PARAMS = (
    Param("particles", Path, None, "Particles with CTF: RELION STAR (3.0/3.1/5) or cryoSPARC .cs. Any poses and "
          "origins they carry are ignored.", required=True, input_role="particles"),
    Param("reference", Path, None, "Optional starting map (MRC, the particles' box and pixel size), low-passed to "
          "--ini_high_A. Without it the run starts from a reconstruction of random images at random orientations.",
          input_role="volume"),
    Param("global_iterations", int, 15, "Iterations of global search over all orientations and shifts (all but the "
          "last on a random --global_subset of the particles).", min=1, max=500),
    Param("local_iterations", int, 6, "Iterations of local, gold-standard refinement that follow (each half-set "
          "against its own half-map, RELION's auto-refine).", min=0, max=200),
    Param("ini_high_A", float, 30.0, "Band limit of the first global iteration and low-pass of the starting map, Å.",
          min=1.0),
    Param("global_high_A", float, 15.0, "Band limit of the last global iteration, Å (the limit shrinks geometrically "
          "from --ini_high_A).", min=1.0),
    Param("resolution_A", float, 0.0, "Never score the images beyond this resolution, Å (0: the images' Nyquist, "
          "2 × the pixel size). The local iterations otherwise score up to their half-map FSC 0.143 plus 3 shells.",
          min=0.0),
    Param("max_shift_A", float, 0.0, "Origins are searched within ±this in x and y, Å (0: 10 % of the box).",
          min=0.0),
    Param("particle_diameter_A", float, 0.0, "Diameter of the soft spherical mask put on the references, Å (0: 80 % "
          "of the box).", min=0.0),
    Param("grid_step_deg", float, 15.0, "Step of the base grid on SO(3), degrees (15: about 4,400 orientations, as "
          "cryoDRGN's 4,608). Each refinement level halves it.", min=2.0, max=45.0, expert=True),
    Param("keep", int, 8, "Poses kept per image and level of the global search; the kept poses are backprojected "
          "with their posterior probabilities.", min=1, max=64, expert=True),
    Param("keep_local", int, 4, "Poses kept per image and level of the local refinement.", min=1, max=64,
          expert=True),
    Param("global_subset", int, 300, "Random particles per global iteration but the last (stochastic EM: new ones "
          "each iteration, so a poor start is not reinforced by all the data at once).", min=10, expert=True),
    Param("init_particles", int, 100, "Images reconstructed at random orientations into the starting map when no "
          "--reference is given.", min=2, expert=True),
    DATADIR,
    Param("batch_size", int, 128, "Images per batch.", min=1, expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (checkpoint.safetensors, "
          "written after every iteration; the one before is kept as checkpoint.prev.safetensors). The settings must "
          "be the same."),
)

#: Largest change of the resolution in the last iteration, in Fourier shells, that counts as converged.
CONVERGED_SHELLS = 1.0
#: Smallest image box the search works on, pixels.
MIN_BOX = 16


def _plot_history(path: Path, history: list[dict[str, Any]]) -> Path:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    it = [h["iteration"] for h in history]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(it, [h["resolution_A"] for h in history], "o-", label="half-map FSC 0.143")
    ax1.plot(it, [h["limit_A"] for h in history], "s--", label="band limit searched")
    ax1.set(xlabel="iteration", ylabel="resolution (Å)")
    ax1.invert_yaxis()
    ax1.legend()
    ax2.plot(it, [h["mean_max_probability"] for h in history], "o-")
    ax2.set(xlabel="iteration", ylabel="mean probability of the best pose", ylim=(0, 1.05))
    n_global = sum(h["phase"] == "global" for h in history)
    for ax in (ax1, ax2):
        ax.axvspan(0.5, n_global + 0.5, color="0.9", zorder=0)
    return save_png(fig, path)


def _plot_orientations(path: Path, euler_deg: np.ndarray) -> Path:
    from cryohet.analysis.plots import density_plot

    return density_plot(euler_deg[:, :2], path, xlabel="rot (deg)", ylabel="tilt (deg)",
                        title="projection directions found")


def prepare(params: dict[str, Any], ctx: Any) -> tuple[Any, Any, Any, np.ndarray]:
    """(particles, AbinitSettings, starting map or None, half-set of each particle) from the parameters shared
    with abinit-het; InputError for particles without CTF, a box too small, limits beyond Nyquist."""
    import torch

    from cryohet.errors import InputError
    from cryohet.inference.abinit import AbinitSettings
    from cryohet.io.mrc import read_map
    from cryohet.io.particles import load_particles
    from cryohet.reconstruct.homogeneous import particle_halves

    pset = load_particles(params["particles"], params["datadir"] or None, require_poses=False)
    if pset.box < MIN_BOX:
        raise InputError(params["particles"], f"the images are {pset.box} px: the pose search needs at least "
                                              f"{MIN_BOX} px")
    nyquist_A = 2 * pset.apix
    if 0 < params["resolution_A"] < nyquist_A:
        raise InputError(params["particles"], f"--resolution_A {params['resolution_A']:g} Å is beyond the images' "
                                              f"Nyquist ({nyquist_A:g} Å at {pset.apix:g} Å/px)")
    for name in ("ini_high_A", "global_high_A"):
        if params[name] < nyquist_A:
            raise InputError(params["particles"], f"--{name} {params[name]:g} Å is beyond the images' Nyquist "
                                                  f"({nyquist_A:g} Å)")
    if params["global_high_A"] > params["ini_high_A"]:
        raise ValueError(f"--global_high_A ({params['global_high_A']:g} Å) must not be coarser than --ini_high_A "
                         f"({params['ini_high_A']:g} Å)")
    if len(pset) < 10:
        raise InputError(params["particles"], f"{len(pset)} particles are too few for an ab initio reconstruction")
    reference = None
    if params["reference"] is not None:
        arr, ref_apix = read_map(params["reference"])
        if arr.shape != (pset.box,) * 3 or (ref_apix and abs(ref_apix - pset.apix) > 1e-3 * pset.apix):
            raise InputError(params["reference"], f"the map is {arr.shape} at {ref_apix:g} Å/px but the particles "
                                                  f"are {pset.box} px at {pset.apix:g} Å/px")
        reference = torch.as_tensor(arr, dtype=torch.float32)
    settings = AbinitSettings(
        n_global=params["global_iterations"], n_local=params["local_iterations"], ini_high_A=params["ini_high_A"],
        global_high_A=params["global_high_A"], resolution_A=params["resolution_A"],
        grid_step_deg=params["grid_step_deg"], keep=params["keep"], keep_local=params["keep_local"],
        max_shift_A=params["max_shift_A"], particle_diameter_A=params["particle_diameter_A"],
        init_particles=params["init_particles"], global_subset=params["global_subset"],
        batch_size=params["batch_size"])
    half = particle_halves(pset, ctx.seed)
    ctx.log.info("%d particles, box %d at %.3f Å/px; %d global iterations (%g -> %g Å), then %d local; half-sets "
                 "of %d and %d", len(pset), pset.box, pset.apix, settings.n_global, settings.ini_high_A,
                 settings.global_high_A, settings.n_local, (half == 1).sum(), (half == 2).sum())
    return pset, settings, reference, half


def write_maps(ctx: Any, fit: Any, label: str) -> float:
    """map.mrc, half1/2.mrc, fsc.star and fsc.png of an AbinitFit, registered; returns the FSC 0.143 resolution."""
    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.io.mrc import write_map

    out = Path(ctx.out_dir)
    box, apix = fit.map.shape[-1], fit.apix
    res = fit.resolution_A()
    write_map(out / "map.mrc", fit.map.cpu().numpy(), apix)
    for j in (0, 1):
        write_map(out / f"half{j + 1}.mrc", fit.half_maps[j].cpu().numpy(), apix)
    write_fsc_star(out / "fsc.star", box, apix, fit.fsc)
    plot_fsc(out / "fsc.png", box, apix, {"ab initio": fit.fsc})
    ctx.add("volume", "map.mrc", label, apix=apix, resolution_A=res, hand=HAND)
    for j in (0, 1):
        ctx.add("half_map", f"half{j + 1}.mrc", f"half-map {j + 1}", apix=apix)
    ctx.add("fsc", "fsc.star", "half-map FSC", resolution_A=res)
    ctx.add("plot", "fsc.png", "half-map FSC")
    return res


def with_poses(pset: Any, euler_deg: np.ndarray, shift_A: np.ndarray) -> Any:
    """``pset`` with the poses found (copies)."""
    return replace(pset, euler_deg=np.array(euler_deg, dtype=np.float64), shift_A=np.array(shift_A, dtype=np.float64))


def pose_columns(posed: Any, half: np.ndarray) -> dict[str, np.ndarray]:
    """The STAR columns of the poses of ``posed`` (RELION's names and conventions) and the half-sets."""
    e, s = posed.euler_deg, posed.shift_A
    return {"rlnAngleRot": e[:, 0], "rlnAngleTilt": e[:, 1], "rlnAnglePsi": e[:, 2], "rlnOriginXAngst": s[:, 0],
            "rlnOriginYAngst": s[:, 1], "rlnRandomSubset": half}


#: the note on the hand every ab initio map carries
HAND = "undetermined: the map and its mirror image explain the images equally well"


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.geometry.euler import matrix_to_euler
    from cryohet.inference.abinit import fit_abinit
    from cryohet.io.particles import write_particles_star

    pset, settings, reference, half = prepare(params, ctx)
    out = Path(ctx.out_dir)
    fit = fit_abinit(pset, half, settings, ctx.device, reference=reference, seed=ctx.seed, log=ctx.log,
                     progress=ctx.progress, checkpoint=out / "checkpoint.safetensors", resume=params["resume"])
    shells = [pset.box * fit.apix / h["resolution_A"] for h in fit.history]
    change = abs(shells[-1] - shells[-2]) if len(shells) > 1 else shells[-1]
    ctx.report_convergence("ab initio refinement (change of the half-map resolution in the last iteration, Fourier "
                           "shells)", change <= CONVERGED_SHELLS, change, CONVERGED_SHELLS, len(fit.history))
    res = write_maps(ctx, fit, "ab initio map (hand undetermined)")
    euler = matrix_to_euler(fit.rotations.astype(np.float64))
    poses = with_poses(pset, euler, fit.shifts_A)
    columns = {**pose_columns(poses, half), "rlnMaxValueProbDistribution": fit.max_probability,
               "rlnLogLikeliContribution": fit.log_likelihood}
    write_particles_star(out / "particles.star", poses, extra_columns=columns)
    ctx.add("particles_star", "particles.star", "particles with the poses found (RELION conventions)",
            n=len(pset), poses=True)
    _plot_history(out / "iterations.png", fit.history)
    ctx.add("plot", "iterations.png", "resolution, band limit and best-pose probability per iteration")
    _plot_orientations(out / "orientations.png", euler)
    ctx.add("plot", "orientations.png", "distribution of the projection directions found")
    ctx.log.info("map at %.2f Å (FSC 0.143 of the half-maps); the hand is %s", res, HAND)


METHOD = Method(
    name="abinit",
    order=22,
    title="Ab initio reconstruction: map and poses from images without poses",
    help="Expectation-maximisation over poses with frequency marching, from particles with CTF and no poses. Global "
         "iterations search every image over SO(3) × shifts hierarchically (a ~15° grid at the band limit that step "
         "resolves, then levels halving the steps and widening the band limit, as cryoDRGN2), each hypothesis at its "
         "best image scale, and backproject the kept poses with their posterior probabilities; local iterations then "
         "refine each half-set against its own half-map (gold standard, RELION's auto-refine) up to its FSC 0.143. "
         "Writes map.mrc, half1.mrc, half2.mrc, fsc.star, particles.star with the poses in RELION's conventions "
         "(relion_reconstruct of it gives the map) and plots. The hand of the map is undetermined.",
    params=PARAMS,
    outputs=("volume", "half_map", "fsc", "particles_star", "plot"),
    run=run,
    needs_poses=False,
    citations=("Zhong ED, Lerer A, Davis JH, Berger B (2021) CryoDRGN2: ab initio neural reconstruction of 3D "
               "protein structures from real cryo-EM images. ICCV 4066-4075.",
               "Scheres SHW (2012) RELION: implementation of a Bayesian approach to cryo-EM structure "
               "determination. J Struct Biol 180:519-530.",
               "Punjani A, Rubinstein JL, Fleet DJ, Brubaker MA (2017) cryoSPARC: algorithms for rapid unsupervised "
               "cryo-EM structure determination. Nat Methods 14:290-296."),
)
