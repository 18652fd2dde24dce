"""``cryohet kernel-volumes``: maps at latent points of any method's latents, by kernel regression of the images."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.errors import InputError
from cryohet.methods.base import DATADIR, LATENT_POINT_PARAMS, Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("run", Path, None, "Run folder of a heterogeneity method: its latents and its particles STAR.",
          input_role="run"),
    Param("particles", Path, None, "Or particles with poses and CTF (RELION STAR or cryoSPARC .cs) ...",
          input_role="particles"),
    Param("latents", Path, None, "... with their latents from any tool, in the particles' order: .npy, .txt/.csv "
          "or cryoDRGN's z.N.pkl (read safely: numpy arrays only)."),
    DATADIR,
    *LATENT_POINT_PARAMS,
    Param("n_points", int, 10, "Without --z/--z_file: maps at this many k-means centres of the latents (each "
          "snapped to the nearest particle), ordered along the first principal component.", min=1),
    Param("min_particles", int, 100, "Particles in the smallest neighbourhood of a point. The neighbourhoods double "
          "from it up to all particles.", min=10),
    Param("n_levels", int, 6, "Neighbourhoods at most (each twice the last, the widest holding all particles).",
          min=1, max=20),
    Param("max_validation", int, 500, "Validation particles at most per point (the nearest ones), whose images "
          "decide the neighbourhood of each frequency shell.", min=4, expert=True),
    Param("local_resolution", bool, True, "Also a local-resolution map per point (FSC of the half-maps in a soft "
          "window of a quarter of the box, moved in steps of a quarter window)."),
    Param("box", int, 0, "Output box in pixels, by Fourier cropping the images (even; 0 keeps the images' box).",
          min=0),
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
)





def _points(params: dict[str, Any], z: np.ndarray, seed: int) -> np.ndarray:
    """The latent points (M, d): --z/--z_file, else k-means centres of the latents ordered along their first PC."""
    from cryohet.analysis.latent import kmeans, pca
    from cryohet.analysis.volumes import points_from_params

    points = points_from_params(params, z.shape[1])
    if points is not None:
        return np.asarray(points, dtype=np.float64)
    centres = kmeans(z, min(params["n_points"], len(z)), seed=seed).centers
    pc1 = pca(z, 1).transform(centres)[:, 0] if z.shape[1] > 1 else centres[:, 0]
    return np.asarray(centres[np.argsort(pc1)], dtype=np.float64)


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.analysis.fsc_files import write_fsc_star
    from cryohet.analysis.kernel_plots import plot_kernel_maps
    from cryohet.analysis.runs import latent_inputs
    from cryohet.analysis.volumes import contour_level, register_series
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import write_particles_star
    from cryohet.models.maps import MODEL_TYPE, MapsModel
    from cryohet.reconstruct.fsc import resolution_at
    from cryohet.reconstruct.homogeneous import particle_halves
    from cryohet.reconstruct.kernel import KernelRegression
    from cryohet.reconstruct.local_fsc import local_resolution, summarise

    inputs = latent_inputs(params)
    pset, z, zpath = inputs.particles, inputs.z, inputs.source
    box = params["box"] or pset.box
    if box % 2 or box > pset.box:
        raise ValueError(f"--box: expected an even size no larger than the images' {pset.box}, got {box}")
    if len(pset) < 2 * params["min_particles"]:
        raise InputError(zpath, f"{len(pset)} particles: kernel volumes need at least twice --min_particles "
                                f"({2 * params['min_particles']}); lower --min_particles or use more particles")
    points = _points(params, z, ctx.seed)
    half = particle_halves(pset, ctx.seed)
    kr = KernelRegression(pset, z, half, box, ctx.device, min_particles=params["min_particles"],
                          n_levels=params["n_levels"], max_validation=params["max_validation"],
                          batch_size=params["batch_size"], progress=ctx.progress)
    ctx.log.info("%d particles with %d-D latents (%s); %d point(s); neighbourhoods of %s particles; box %d at "
                 "%.4g Å/px", len(pset), z.shape[1], zpath, len(points), ", ".join(map(str, kr.sizes)), kr.box,
                 kr.apix)
    out = ctx.out_dir
    (out / "maps").mkdir(exist_ok=True)
    files, levels, fscs, per_shell, near, resolutions = [], [], [], [], [], []
    for i, p in enumerate(points):
        km = kr.map_at(p)
        stem = f"maps/kernel_{i:03d}"
        for suffix, vol in (("", km.full), ("_half1", km.half1), ("_half2", km.half2)):
            write_map(out / f"{stem}{suffix}.mrc", vol.cpu().numpy(), kr.apix)
        for j in (1, 2):
            ctx.add("half_map", f"{stem}_half{j}.mrc", f"kernel map {i} half-map {j}", index=i, apix=kr.apix)
        res = resolution_at(km.fsc, kr.box, kr.apix)
        write_fsc_star(out / f"{stem}_fsc.star", kr.box, kr.apix, km.fsc)
        ctx.add("fsc", f"{stem}_fsc.star", f"kernel map {i} half-map FSC", index=i, resolution_A=round(res, 3))
        low, high = km.particles_per_shell[[min(3, kr.box // 2), kr.box // 2]]
        ctx.log.info("point %d/%d (%s): %.2f Å at FSC 0.143; particles behind shell 3: %d, Nyquist: %d",
                     i + 1, len(points), ", ".join(f"{v:.4g}" for v in p), res, low, high)
        if km.n_near < km.sizes[0] // 4:
            ctx.log.warning("point %d lies where the latents are sparse: %d particles within the distance that "
                            "holds %d around a typical particle; its smallest neighbourhood reaches %.3g "
                            "(whitened units), so its map mixes other states", i + 1, km.n_near, km.sizes[0],
                            km.radii[0])
        full = km.full.cpu().numpy()
        levels.append(contour_level(full))
        if params["local_resolution"]:
            locres = local_resolution(km.half1, km.half2, kr.apix)
            write_map(out / f"{stem}_locres.mrc", locres.cpu().numpy(), kr.apix)
            inside = (km.full > levels[-1]).to(locres.device).float()
            spread = summarise(locres, inside)  # over the molecule (the map above its contour level)
            ctx.add("local_resolution", f"{stem}_locres.mrc", f"kernel map {i} local resolution (Å) in the "
                    "molecule", index=i, apix=kr.apix, **{k: round(v, 3) for k, v in spread.items()})
        files.append(out / f"{stem}.mrc")
        fscs.append(km.fsc)
        per_shell.append(km.particles_per_shell)
        near.append(km.n_near)
        resolutions.append(round(res, 3))
    register_series(ctx, files, points, kr.apix, levels, "kernel", "kernel-regression map", out / "kernel_maps.cxc",
                    "cryohet kernel-volumes", per_map={"resolution_A": resolutions, "n_near": near,
                                                       "particles_per_shell": [n.tolist() for n in per_shell]})
    MapsModel(files, points, kr.apix).save(out / "kernel_maps.json")
    ctx.add("model", "kernel_maps.json", "maps at latent points (the nearest point's map for any latent)",
            model_type=MODEL_TYPE, n_maps=len(points))
    save_npy(out / "latents.npy", z.astype(np.float32))
    ctx.add("latents", "latents.npy", f"the input latents (N, {z.shape[1]})", dim=int(z.shape[1]),
            source=str(zpath))
    with atomic_path(out / "z_values.txt") as tmp:
        np.savetxt(tmp, points, fmt="%.6g", header="latent point of kernel_000.mrc, kernel_001.mrc, ...")
    write_particles_star(out / "particles.star", pset, extra_columns={"rlnRandomSubset": half})
    ctx.add("particles_star", "particles.star", "input particles with their half-set (rlnRandomSubset)",
            n=len(pset))
    png = plot_kernel_maps(out / "kernel_maps.png", per_shell, fscs, kr.box, kr.apix)
    ctx.add("plot", png, "particles behind each frequency shell, and the half-map FSC, per point")


METHOD = Method(
    name="kernel-volumes",
    order=55,
    title="Maps at latent points by kernel regression",
    help="For each latent point, reconstruct from the particles whose latents are near it: neighbourhoods that "
         "double from --min_particles to all particles, each backprojected as two half-sets, and each frequency "
         "shell taken from the neighbourhood whose half-maps best predict the nearest particles' images of the "
         "other half-set (cross-validation; few particles at low resolution where the conformations differ, many "
         "at high resolution). Works on the latents of any method (a cryohet run, or cryoDRGN's z.pkl with its "
         "particles). Writes maps/kernel_XXX.mrc with half-maps, FSC and local resolution, kernel_maps.png, a "
         "ChimeraX series, kernel_maps.json (the maps by latent point, for benchmark-score) and particles.star.",
    params=PARAMS,
    outputs=("volume_series", "half_map", "fsc", "local_resolution", "model", "latents", "particles_star", "plot",
             "chimerax"),
    run=run,
    citations=("Gilles MA, Singer A (2025) Cryo-EM heterogeneity analysis using regularized covariance "
               "estimation and kernel regression. PNAS 122:e2419140122.",),
)
