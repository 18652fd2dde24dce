"""``cryohet landscape``: free-energy landscape of any method's latents, its minima, a minimum free-energy path,
maps and particle subsets along it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.methods.base import DATADIR, Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("run", Path, None, "Run folder of a heterogeneity method: its latents, their uncertainty when it gives "
          "one (principal-volumes' s.d., train-vae's log-variance) and its particles STAR.", input_role="run"),
    Param("particles", Path, None, "Or particles (RELION STAR or cryoSPARC .cs) ...", input_role="particles"),
    Param("latents", Path, None, "... with their latents from any tool, in the particles' order (.npy, .txt/.csv, "
          "cryoDRGN's z.N.pkl). Without --particles only the landscape is made (no STAR files, no maps)."),
    Param("latents_std", Path, None, "Per-particle s.d. of the --latents (.npy (N, d)); none: latents taken as "
          "exact (a plain smoothed density)."),
    DATADIR,
    Param("dims", int, 2, "Landscape dimensions: the latents themselves when they have at most this many, else "
          "their first principal components.", min=1, max=4),
    Param("grid", int, 0, "Grid points per axis (0: 200, 60, 24, 12 for 1-4 dimensions).", min=0),
    Param("bootstrap", int, 10, "Bootstrap resamples for the free energy's uncertainty (0: none).", min=0),
    Param("path_from", str, None, "Start of the minimum free-energy path: a point in the landscape's coordinates "
          "(comma-separated) or a minimum's number (0: the deepest). Default: minimum 0."),
    Param("path_to", str, None, "End of the path, as --path_from. Default: minimum 1 (the second deepest)."),
    Param("path_points", int, 10, "Points along the path (maps and particle subsets).", min=2),
    Param("path_maps", bool, True, "Kernel-regression maps at the path's points (as kernel-volumes; needs the "
          "particles' images)."),
    Param("min_particles", int, 100, "Smallest neighbourhood of the path maps (see kernel-volumes).", min=10,
          expert=True),
)





def _reduce(z: np.ndarray, std: np.ndarray | None, dims: int, log) -> tuple[np.ndarray, np.ndarray, list[str],
                                                                                  dict[str, Any]]:
    """Landscape coordinates, their variances and axis names: the latents, or their first ``dims`` PCs (the
    variance of a PC coordinate from the per-axis variances, axes taken as independent)."""
    from cryohet.analysis.latent import pca

    d = z.shape[1]
    var = np.zeros_like(z) if std is None else std**2
    if d <= dims:
        return z, var, [f"z{k + 1}" for k in range(d)], {}
    pcs = pca(z, dims)
    log.info("latents of %d dimensions: the landscape is over their first %d principal components (%.0f %% of "
             "the variance)", d, dims, 100 * pcs.explained_variance_ratio.sum())
    return (pcs.transform(z), var @ (pcs.components.T**2), [f"PC{k + 1}" for k in range(dims)],
            {"pca_components": pcs.components.round(6).tolist(), "pca_mean": pcs.mean.round(6).tolist()})


def _endpoint(text: str | None, default: int, minima: np.ndarray, grid, d: int, flag: str) -> int:
    """Flat grid index of a path end: a minimum's number or a point."""
    from cryohet.analysis.volumes import parse_z

    if text is None or text.strip().isdigit():
        k = default if text is None else int(text)
        if k >= len(minima):
            raise ValueError(f"{flag}: the landscape has {len(minima)} minima (numbered from 0), not {k + 1}")
        return int(minima[k])
    return int(grid.nearest(parse_z(text, d, flag))[0])


def log_fit(log, fit, n: int, deconvolved: bool) -> None:
    """Log a fitted landscape's grid and smoothing choice (``n`` particles)."""
    log.info("%d particles, %d-D landscape on a %s grid; %s; smoothing %.4g (held-out log-likelihood per "
             "candidate: %s)", n, fit.G.ndim, "×".join(map(str, fit.grid.shape)),
             "deconvolved from each particle's uncertainty" if deconvolved else "latents taken as exact",
             fit.smooth, ", ".join(f"{c:.3g}: {s:.4g}" for c, s in zip(fit.candidates, fit.scores, strict=True)))


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.analysis import landscape as L
    from cryohet.analysis.landscape_plots import plot_landscape, plot_path_profile
    from cryohet.analysis.runs import latent_inputs
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.io.particles import write_particles_star

    inputs = latent_inputs(params, need_particles=False)
    pset, z, std = inputs.particles, inputs.z, inputs.std
    y, var, names, pca_meta = _reduce(z, std, params["dims"], ctx.log)
    d = y.shape[1]
    fit = L.fit_landscape(y, var if std is not None else None, params["grid"] or None, params["bootstrap"],
                          seed=ctx.seed, device=ctx.device, progress=ctx.progress)
    log_fit(ctx.log, fit, len(y), std is not None)
    grid, smooth, p, G, G_std = fit.grid, fit.smooth, fit.density, fit.G, fit.G_std
    minima = L.local_minima(G, max_G=10.0)
    ends = None  # the path's ends, checked before anything is written
    if len(minima) >= 2 or params["path_from"] or params["path_to"]:
        ends = (_endpoint(params["path_from"], 0, minima, grid, d, "--path_from"),
                _endpoint(params["path_to"], 1, minima, grid, d, "--path_to"))
    out = ctx.out_dir
    with atomic_path(out / "landscape.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, density=p, free_energy_kT=G, free_energy_std_kT=G_std, minima=grid.points()[minima],
                 **{f"axis{k}": a for k, a in enumerate(grid.axes)})
    ctx.add("model", "landscape.npz", f"density and free energy (kT) on the {d}-D grid (axes axis0..)",
            model_type="landscape", axes=names, smoothing=smooth, minima=grid.points()[minima].round(5).tolist(),
            minima_kT=G.ravel()[minima].round(3).tolist(), **pca_meta)
    G_i, G_i_std = grid.sample(G, y), grid.sample(G_std, y)
    save_npy(out / "free_energy.npy", np.stack([G_i, G_i_std], axis=1).astype(np.float32))
    ctx.add("latents", "free_energy.npy", "free energy at each particle's latent and its s.d. (N, 2), kT",
            content="free_energy", dim=2)
    save_npy(out / "coordinates.npy", y.astype(np.float32))

    route = points = None
    if ends is not None:
        route = L.minimum_free_energy_path(G, grid, *ends)
        points = L.resample_path(route, params["path_points"])
        G_path, G_path_std = grid.sample(G, points), grid.sample(G_std, points)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        barrier = float(G_path.max() - G_path[[0, -1]].max())
        ctx.log.info("path from %s to %s: barrier %.2f kT above the higher end, highest point %.2f kT",
                     np.round(points[0], 4), np.round(points[-1], 4), barrier, G_path.max())
        if G_path.max() > -np.log(1e-6):
            ctx.log.warning("the path crosses a region with (almost) no particles (%.1f kT): the two ends are not "
                            "connected in the data, and the maps between them are guesses", G_path.max())
        with atomic_path(out / "path.txt") as tmp:
            np.savetxt(tmp, np.column_stack([points, G_path, G_path_std]), fmt="%.6g",
                       header=" ".join(names) + " free_energy_kT free_energy_std_kT")
        ctx.add("report", "path.txt", "points of the minimum free-energy path with G and its s.d.",
                barrier_kT=round(barrier, 3), n_points=len(points))
        ctx.add("plot", plot_path_profile(out / "path_profile.png", arc, G_path, G_path_std),
                "free energy along the path")
    else:
        ctx.log.warning("the landscape has %d minimum: no path (give --path_from and --path_to)", len(minima))
    ctx.add("plot", plot_landscape(out / "landscape.png", grid, G, G_std, minima, route, names),
            "free-energy landscape with its minima and the path")

    if pset is None:
        return
    cols = {"cryohetFreeEnergy": G_i, "cryohetFreeEnergyStd": G_i_std}
    write_particles_star(out / "particles.star", pset, extra_columns=cols)
    ctx.add("particles_star", "particles.star", "particles with their free energy (cryohetFreeEnergy, kT) and "
            "its s.d.", n=len(pset))
    if points is None:
        return
    spacing = float(np.linalg.norm(np.diff(points, axis=0), axis=1).mean())
    dist = np.linalg.norm(y[:, None, :] - points[None], axis=2)
    nearest = dist.argmin(1)
    on_path = dist.min(1) <= max(spacing, 1e-12)
    for k in range(len(points)):
        rows = np.flatnonzero(on_path & (nearest == k))
        if len(rows) == 0:
            ctx.log.warning("path point %d has no particles within %.3g: no subset", k, spacing)
            continue
        name = f"particles_path_{k:03d}.star"
        write_particles_star(out / name, pset, rows=rows)
        ctx.add("particles_star", name, f"particles nearest path point {k}", n=len(rows), index=k,
                point=points[k].round(5).tolist())
    if params["path_maps"]:
        kernel_series(ctx, pset, y, points, params["min_particles"], "path_maps", "path", "map along the path",
                      "cryohet landscape: path")


def kernel_series(ctx, pset, y: np.ndarray, points: np.ndarray, min_particles: int, folder: str, series: str,
                  label: str, title: str) -> None:
    """Kernel-regression maps at ``points`` of the latents ``y`` (see kernel-volumes), written as
    ``folder/<series>_XXX.mrc`` and registered as one series with a ChimeraX script."""
    from cryohet.analysis.volumes import contour_level, register_series
    from cryohet.io.mrc import write_map
    from cryohet.reconstruct.homogeneous import particle_halves
    from cryohet.reconstruct.kernel import KernelRegression

    if len(pset) < 2 * min_particles:
        ctx.log.warning("%d particles: too few for the %ss (at least %d)", len(pset), label, 2 * min_particles)
        return
    half = particle_halves(pset, ctx.seed)
    kr = KernelRegression(pset, y, half, pset.box, ctx.device, min_particles=min_particles, progress=ctx.progress)
    (ctx.out_dir / folder).mkdir(exist_ok=True)
    files, levels = [], []
    for k, point in enumerate(points):
        vol = kr.map_at(point).full.cpu().numpy()
        files.append(ctx.out_dir / folder / f"{series}_{k:03d}.mrc")
        write_map(files[-1], vol, kr.apix)
        levels.append(contour_level(vol))
    register_series(ctx, files, points, kr.apix, levels, series, label, ctx.out_dir / f"{folder}.cxc", title)

METHOD = Method(
    name="landscape",
    order=57,
    title="Free-energy landscape and paths",
    help="Density of the latents on a grid (up to 4 dimensions; principal components beyond), deconvolved from "
         "each particle's latent uncertainty when the method gives one (EM with a smoothing step chosen by "
         "held-out likelihood), the free energy −log p in kT with bootstrap s.d. (also per particle, as a "
         "particles-STAR column), its minima, the minimum free-energy path between two minima or points, "
         "kernel-regression maps and particle subsets along the path. Writes landscape.npz/png, free_energy.npy, "
         "path.txt, path_profile.png, particles.star, particles_path_XXX.star and path_maps/.",
    params=PARAMS,
    outputs=("model", "latents", "report", "plot", "particles_star", "volume_series", "chimerax"),
    run=run,
    citations=("Silverman BW, Jones MC, Wilson JD, Nychka DW (1990) A smoothed EM approach to indirect estimation "
               "problems. J R Stat Soc B 52:271-324.",),
)
