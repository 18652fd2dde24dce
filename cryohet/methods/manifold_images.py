"""``cryohet manifold-images``: a conformational coordinate per particle from diffusion maps of its images, grouped
by projection direction (ManifoldEM class), with the occupancy along it as a free-energy profile and maps along it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.errors import InputError
from cryohet.methods.base import DATADIR, Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF (RELION STAR or cryoSPARC .cs).", required=True,
          input_role="particles"),
    Param("volume", Path, None, "Consensus map (MRC) whose projections are subtracted from the images (default: "
          "a reconstruction of the particles).", input_role="volume"),
    DATADIR,
    Param("resolution_A", float, 15.0, "Images are compared up to this resolution (Å); they are Fourier-cropped "
          "to it.", min=0.0),
    Param("mask_diameter_A", float, 0.0, "Diameter (Å) of the soft circle around the particle in which images are "
          "compared (0: from the consensus map's extent, plus 10 %).", min=0.0),
    Param("per_direction", int, 100, "Particles per projection direction wanted: the directions' spacing is set "
          "from it (fewer and narrower directions mix fewer views; more particles average more noise).", min=20),
    Param("min_per_direction", int, 50, "Directions with fewer particles are dropped; their particles join the "
          "nearest kept direction.", min=10),
    Param("max_per_direction", int, 2000, "Diffusion maps are fitted on at most this many particles of a "
          "direction; the others are placed by Nyström extension.", min=50, expert=True),
    Param("neighbours", int, 10, "Diffusion-map bandwidth: every image has this many neighbours within it (the "
          "largest squared distance to this nearest neighbour).", min=2, expert=True),
    Param("refine_rounds", int, 2, "Rounds of refinement across directions: particles binned along the coordinate, "
          "the bins reconstructed, every image scored against every bin's map (one E-step of 3-D classification) "
          "and placed at the posterior mean (0: the directions' diffusion maps alone, as ManifoldEM).", min=0),
    Param("refine_bins", int, 8, "Bins along the coordinate in each refinement round.", min=3, expert=True),
    Param("n_frames", int, 10, "Maps along the coordinate (kernel regression at evenly spaced positions; 0: "
          "none).", min=0),
    Param("min_particles", int, 100, "Smallest neighbourhood of those maps (see kernel-volumes).", min=10,
          expert=True),
    Param("spectral_functions", int, 0, "Also spectral volumes at the --n_frames positions: maps expanded in this many "
          "Laplacian eigenfunctions of the coordinate's graph besides the constant, fitted to all images by least "
          "squares, each weighted by its half-set FSC (0: none).", min=0, max=20),
    Param("bootstrap", int, 10, "Bootstrap resamples for the free energy's uncertainty (0: none).", min=0),
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
)


def _consensus(params: dict[str, Any], ctx: RunContext, pset, box: int, half: np.ndarray):
    """The consensus map on the working lattice: --volume Fourier-cropped, else a reconstruction."""
    import torch

    from cryohet.geometry.fourier import fourier_crop_3d
    from cryohet.io.mrc import read_map
    from cryohet.reconstruct.homogeneous import reconstruct_halves

    if params["volume"] is not None:
        vol, apix = read_map(params["volume"])
        if vol.shape != (pset.box,) * 3:
            raise InputError(params["volume"], f"the map is {vol.shape[-1]} px but the images are {pset.box} px")
        if abs(apix - pset.apix) > 0.01 * pset.apix:
            ctx.log.warning("%s has %.4g Å/px but the particles %.4g Å/px: used as if they matched",
                            params["volume"], apix, pset.apix)
        return fourier_crop_3d(torch.as_tensor(np.array(vol, np.float32)), box) * (box / pset.box) ** 3
    rec = reconstruct_halves(pset, half, params["batch_size"], ctx.device, box=box, progress=ctx.progress)
    return rec.full


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.analysis.landscape import fit_landscape
    from cryohet.analysis.manifold_plots import plot_image_manifold
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.geometry.euler import matrix_to_euler
    from cryohet.geometry.lattice import Lattice, box_for_resolution
    from cryohet.inference.image_manifold import image_manifold, refine_along
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods.landscape import kernel_series, log_fit
    from cryohet.reconstruct.homogeneous import particle_halves
    from cryohet.simulate.density import particle_radius_A

    if params["spectral_functions"] and not params["n_frames"]:
        raise ValueError("--spectral_functions makes maps at the --n_frames positions: give --n_frames above 0")
    pset = load_particles(params["particles"], datadir=params["datadir"])
    n = len(pset)
    if n < 2 * params["min_per_direction"]:
        raise InputError(pset.source, f"{n} particles: image manifolds need at least two directions of "
                                      f"--min_per_direction ({params['min_per_direction']}) particles")
    box = box_for_resolution(pset.box, pset.apix, params["resolution_A"])
    lattice = Lattice(pset.box, pset.apix).cropped(box)
    half = particle_halves(pset, ctx.seed)
    consensus = _consensus(params, ctx, pset, box, half)
    radius_A = (params["mask_diameter_A"] / 2 if params["mask_diameter_A"] > 0
                else 1.1 * particle_radius_A(consensus.cpu().numpy(), lattice.apix))
    mask_px = min(radius_A / lattice.apix, box / 2 - 1)
    radius_px = box / 2 if params["resolution_A"] <= 0 else min(box / 2, box * lattice.apix / params["resolution_A"])
    ctx.log.info("%d particles; images compared at box %d (%.3g Å/px) up to %.3g Å within a %.0f Å circle", n,
                 box, lattice.apix, box * lattice.apix / radius_px, 2 * mask_px * lattice.apix)
    man = image_manifold(pset, consensus, lattice, radius_px=radius_px, mask_radius_px=mask_px,
                         per_direction=params["per_direction"], min_particles=params["min_per_direction"],
                         max_per_direction=params["max_per_direction"], k_neighbours=params["neighbours"],
                         device=ctx.device, seed=ctx.seed, batch_size=params["batch_size"], progress=ctx.progress)
    D = len(man.bins.directions)
    counts = np.bincount(man.bins.label, minlength=D)
    ctx.log.info("%d projection directions (%d-%d particles each); the neighbours' motion signatures agree with "
                 "one sense to %.0f %%", D, counts.min(), counts.max(), 100 * man.agreement)
    if man.agreement < 0.6:
        ctx.log.warning("the directions' senses of motion agree poorly (%.0f %%): the coordinate may mix "
                        "motions or fold one onto itself; check manifold_directions.png", 100 * man.agreement)
    s_maps, s_std = man.s, None
    for r in range(params["refine_rounds"]):
        new, s_std = refine_along(pset, s_maps, lattice, half, params["refine_bins"],
                                  box * lattice.apix / radius_px, device=ctx.device, seed=ctx.seed,
                                  batch_size=params["batch_size"], progress=ctx.progress)
        ctx.log.info("refinement round %d/%d: mean change of the coordinate %.4f, its median s.d. %.4f", r + 1,
                     params["refine_rounds"], float(np.abs(new - s_maps).mean()), float(np.median(s_std)))
        s_maps = new
    out = ctx.out_dir
    s = s_maps[:, None]
    save_npy(out / "latents.npy", s.astype(np.float32))
    std_meta = {}
    if s_std is not None:
        save_npy(out / "latents_std.npy", s_std[:, None].astype(np.float32))
        # a posterior mean over coarse bins is shrunk towards the middle, so its posterior spread is not a
        # measurement error to deconvolve: landscape reads it as exact (registered as posterior_std, not std;
        # deconvolving by it made the 20k-particle hinge's free energy 0.87 kT RMS from the truth, 0.61 as exact)
        std_meta = {"posterior_std": "latents_std.npy"}
    ctx.add("latents", "latents.npy", "position along the motion in [0, 1] (N, 1)", dim=1,
            refine_rounds=params["refine_rounds"], **std_meta)
    euler = matrix_to_euler(man.bins.frames)
    table = np.column_stack([np.arange(D), euler[:, 0], euler[:, 1], counts, man.eigenvalues[:, 0],
                             man.eigenvalues[:, 1] if man.eigenvalues.shape[1] > 1 else np.zeros(D), man.signs])
    with atomic_path(out / "directions.txt") as tmp:
        np.savetxt(tmp, table, fmt=["%d", "%.2f", "%.2f", "%d", "%.5f", "%.5f", "%+d"],
                   header="direction rot_deg tilt_deg particles eigenvalue1 eigenvalue2 sign")
    ctx.add("report", "directions.txt", "projection directions: particles, diffusion eigenvalues, sense",
            n_directions=D, agreement=round(man.agreement, 4))

    fit = fit_landscape(s, None, None, params["bootstrap"], seed=ctx.seed, device=ctx.device, progress=ctx.progress)
    log_fit(ctx.log, fit, n, False)
    G_i, G_i_std = fit.grid.sample(fit.G, s), fit.grid.sample(fit.G_std, s)
    with atomic_path(out / "landscape.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, density=fit.density, free_energy_kT=fit.G, free_energy_std_kT=fit.G_std, axis0=fit.grid.axes[0])
    ctx.add("model", "landscape.npz", "occupancy and free energy (kT) along the coordinate (axis0)",
            model_type="landscape", axes=["s"], smoothing=fit.smooth)
    png = plot_image_manifold(out / "manifold_directions.png", man, fit)
    ctx.add("plot", png, "free energy along the coordinate; directions and their sense; neighbours' agreement")
    write_particles_star(out / "particles.star", pset, extra_columns={
        "cryohetManifoldCoordinate": s_maps, "cryohetManifoldDiffusion": man.s,
        "cryohetProjectionDirection": man.bins.label,
        **({"cryohetManifoldCoordinateStd": s_std} if s_std is not None else {}),
        "cryohetFreeEnergy": G_i, "cryohetFreeEnergyStd": G_i_std})
    ctx.add("particles_star", "particles.star", "particles with their coordinate (cryohetManifoldCoordinate, "
            "its posterior s.d. cryohetManifoldCoordinateStd; before refinement: cryohetManifoldDiffusion), "
            "direction and free energy (kT)", n=n)
    if params["n_frames"]:
        points = np.linspace(0.05, 0.95, params["n_frames"])[:, None]
        kernel_series(ctx, pset, s, points, params["min_particles"], "maps", "frame",
                      "map along the coordinate", "cryohet manifold-images")
        if params["spectral_functions"]:
            _spectral_series(params, ctx, pset, s, half, points)


def _spectral_series(params: dict[str, Any], ctx: RunContext, pset, s: np.ndarray, half: np.ndarray,
                     points: np.ndarray) -> None:
    """Spectral volumes of the coordinate ``s`` at ``points``, written as maps_spectral/spectral_XXX.mrc."""
    from cryohet.analysis.volumes import contour_level, register_series
    from cryohet.inference.spectral_volumes import fit_spectral_volumes
    from cryohet.io.mrc import write_map
    from cryohet.reconstruct.fsc import resolution_at

    sv = fit_spectral_volumes(pset, s, params["spectral_functions"], half, k_neighbours=params["neighbours"],
                              batch_size=params["batch_size"], device=ctx.device, seed=ctx.seed,
                              progress=ctx.progress)
    res = [round(resolution_at(c, pset.box, pset.apix), 2) for c in sv.fsc]
    ctx.log.info("spectral volumes: resolution (FSC 0.143 of the half-sets) of the constant and of each "
                 "eigenfunction's map: %s Å", ", ".join(map(str, res)))
    (ctx.out_dir / "maps_spectral").mkdir(exist_ok=True)
    files, levels = [], []
    for k, vol in enumerate(sv.volumes(points)):
        files.append(ctx.out_dir / "maps_spectral" / f"spectral_{k:03d}.mrc")
        write_map(files[-1], vol, sv.apix)
        levels.append(contour_level(vol))
    register_series(ctx, files, points, sv.apix, levels, "spectral", "spectral volume along the coordinate",
                    ctx.out_dir / "maps_spectral.cxc", "cryohet manifold-images: spectral volumes",
                    per_map={"function_resolution_A": [res] * len(files)})


METHOD = Method(
    name="manifold-images",
    order=56,
    title="Conformational coordinate from image manifolds",
    help="ManifoldEM class: particles are grouped by projection direction; in each direction the images, minus the "
         "consensus map's projection at their pose and rotated into one frame, are embedded by a density-free "
         "diffusion map of their CTF-aware distances; the first diffusion coordinate of every direction is given "
         "one sense by comparing the motion's signature between neighbouring directions, and turned into a "
         "position s in [0, 1] along the motion (its arc length). Refinement rounds then score every image "
         "against maps of particles binned along s (all directions together) and move it to its posterior mean "
         "position, with the posterior s.d. (latents_std.npy). Writes latents.npy (s), particles.star with s and "
         "the free energy, the free-energy profile "
         "along s (landscape.npz, manifold_directions.png), directions.txt, kernel-regression maps along s (maps/, "
         "ChimeraX series) and optionally Laplacian spectral volumes along s (maps_spectral/). Its latents feed "
         "landscape and kernel-volumes (--run).",
    params=PARAMS,
    outputs=("latents", "report", "model", "plot", "particles_star", "volume_series", "chimerax"),
    run=run,
    citations=("Dashti A, et al. (2014) Trajectories of the ribosome as a Brownian nanomachine. PNAS 111:17492.",
               "Coifman RR, Lafon S (2006) Diffusion maps. Appl Comput Harmon Anal 21:5-30.",
               "Moscovich A, Halevi A, Andén J, Singer A (2020) Cryo-EM reconstruction of continuous heterogeneity by "
               "Laplacian spectral volumes. Inverse Probl 36:024003.",
               "Singer A (2011) Angular synchronization by eigenvectors and semidefinite programming. Appl Comput "
               "Harmon Anal 30:20-36."),
)
