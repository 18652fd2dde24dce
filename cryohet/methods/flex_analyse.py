"""``cryohet flex-analyse``: principal motions of the rigid bodies of a multi-body run (as relion_flex_analyse)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import Method, Param

PARAMS = (
    Param("run", Path, None, "Folder of a 'cryohet multibody' run (its body maps, masks, body motions and "
          "particles).", required=True, input_role="run"),
    Param("relative_to", int, 0, "Analyse the motions relative to this body (1-based): each body's motion is "
          "composed with the inverse of this body's, so the motion all bodies share (the consensus poses' own "
          "errors, a rigid motion of the whole particle) drops out and only the flexibility remains. 0: relative to "
          "the consensus, as relion_flex_analyse.", min=0),
    Param("components", int, 0, "Make maps along this many principal components; 0: as many as explain "
          "--variance.", min=0),
    Param("variance", float, 0.75, "With --components 0: make maps along the fewest components that together "
          "explain this fraction of the variance.", min=0.0, max=1.0),
    Param("maps_per_component", int, 10, "Maps along each component: one per equally populated bin of the "
          "particles sorted along it, at the bin's mean.", min=2, max=100),
    Param("bins", int, 100, "Bins of the histograms of the particles' coordinates on each component.", min=5),
    Param("select_component", int, 0, "Write the particles whose coordinate on this component (1-based) lies in "
          "[--select_min, --select_max] as particles_selected.star. 0: no selection.", min=0),
    Param("select_min", float, None, "Lowest coordinate kept by the selection (none: open)."),
    Param("select_max", float, None, "Highest coordinate kept by the selection (none: open)."),
)


def _body_inputs(run_dir: Path, record: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Body maps, masks, centres (Å), frames and the pixel size, from the multibody run's record."""
    from cryohet.errors import InputError
    from cryohet.io.mrc import read_map

    vols = {o.meta["body"]: o for o in record.of_kind("volume") if "body" in o.meta}
    masks = {o.meta["body"]: o for o in record.of_kind("mask") if "body" in o.meta}
    if not vols or set(vols) != set(masks):
        raise InputError(run_dir, "the run holds no body maps and masks: is it a 'cryohet multibody' run?")
    maps, mask_arr, centres, frames, apix = [], [], [], [], 0.0
    for b in sorted(vols):
        vol, apix = read_map(run_dir / vols[b].path)
        mask, _ = read_map(run_dir / masks[b].path)
        if mask.shape != vol.shape:
            raise InputError(run_dir / masks[b].path, f"mask shape {mask.shape} differs from body map {vol.shape}")
        maps.append(vol)
        mask_arr.append(mask)
        centres.append(masks[b].meta["centre_A"])
        frames.append(masks[b].meta["frame"])
    return np.stack(maps), np.stack(mask_arr), np.asarray(centres, float), np.asarray(frames, float), float(apix)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis import body_flex, plots
    from cryohet.analysis.runs import load_latents, particles_star_path
    from cryohet.analysis.volumes import contour_level, write_chimerax_script
    from cryohet.atomic import save_npy
    from cryohet.errors import InputError
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.record import read_record

    run_dir = Path(params["run"]).resolve()
    record = read_record(run_dir)
    if record.method != "multibody":
        raise InputError(run_dir, f"not a multibody run (it is a {record.method} run)")
    motions, motions_path = load_latents(run_dir)
    maps, masks, centres, frames, apix = _body_inputs(run_dir, record)
    nb = len(maps)
    if motions.shape[1] != 6 * nb:
        raise InputError(motions_path, f"{motions.shape[1]} columns for {nb} bodies (6 per body expected)")
    star = particles_star_path(run_dir)
    pset = load_particles(star, require_poses=False)
    n = len(motions)
    if len(pset) != n:
        raise InputError(star, f"{len(pset)} particles but the body motions ({motions_path}) have {n} rows")
    if n < 6 * nb:
        raise InputError(motions_path, f"{n} particles are too few for a PCA of {6 * nb} numbers per particle")
    if params["select_component"] > 6 * nb:
        raise ValueError(f"--select_component {params['select_component']}: there are {6 * nb} components")

    if params["relative_to"] > nb:
        raise ValueError(f"--relative_to {params['relative_to']}: the run has {nb} bodies")
    if params["relative_to"]:
        motions = body_flex.relative_motions(motions, centres, frames, params["relative_to"] - 1)
        ctx.log.info("motions relative to body %d", params["relative_to"])
    scales = body_flex.column_scales(maps, masks, centres, frames, apix)
    result = body_flex.flex_pca(motions, scales)
    ratio = result.explained_variance_ratio
    ctx.log.info("%d particles, %d bodies; variance explained per component: %s", n, nb,
                 " ".join(f"{100 * r:.1f}%" for r in ratio))
    src = {"source_run": str(run_dir), "source_latents": str(Path(motions_path).resolve())}
    out = Path(ctx.out_dir)
    coords = result.projections.astype(np.float32)
    columns = {f"cryohetFlexComponent{k + 1}": coords[:, k] for k in range(coords.shape[1])}
    write_particles_star(out / "particles.star", pset, extra_columns=columns)
    ctx.add("particles_star", "particles.star", "the run's particles with their coordinate on each component "
            "(cryohetFlexComponent<k>)", n=n, **src)
    save_npy(out / "components.npy", coords)
    ctx.add("latents", "components.npy", "coordinates of the particles on the principal components of the body "
            "motions (N × 6 per body, STAR row order)", content="z", analysis="body_flex_pca",
            relative_to=params["relative_to"], explained_variance_ratio=ratio.round(6).tolist(),
            column_scales=scales.round(6).tolist(),
            mean=result.pca.mean.round(6).tolist(), components=result.pca.components.round(6).tolist(), **src)
    ctx.add("plot", body_flex.variance_plot(out / "variance.png", ratio), "variance explained per component")

    k_maps = params["components"] or result.components_for(params["variance"])
    k_maps = min(k_maps, coords.shape[1])
    ctx.log.info("maps along %d component(s) (%.1f %% of the variance)", k_maps, 100 * ratio[:k_maps].sum())
    for k in range(coords.shape[1]):
        label = f"component {k + 1} ({100 * ratio[k]:.1f} %)"
        png = plots.histogram_plot(coords[:, k], out / f"component{k + 1:03d}_histogram.png", xlabel=label,
                                   title=f"particles along {label}", bins=params["bins"])
        ctx.add("plot", png, f"histogram of {label}", component=k + 1)
        if k >= k_maps:
            continue
        values = body_flex.bin_means(coords[:, k], params["maps_per_component"])
        files = []
        folder = out / f"component{k + 1:03d}"
        for i, motion in enumerate(result.motions_at(k, values)):
            vol = body_flex.combine_bodies(maps, masks, centres, frames, motion, apix)
            path = folder / f"bin{i + 1:03d}.mrc"
            write_map(path, vol, apix)
            files.append(path)
            ctx.add("volume_series", path, f"{label}, bin {i + 1}", series=f"component{k + 1:03d}", component=k + 1,
                    index=i, n_maps=len(values), value=round(float(values[i]), 6), apix=apix)
        cxc = write_chimerax_script(folder / f"component{k + 1:03d}.cxc", files, contour_level(maps[0] * masks[0]),
                                    title=f"cryohet flex-analyse: maps along {label}")
        ctx.add("chimerax", cxc, f"ChimeraX: maps along {label}", component=k + 1, n_maps=len(files))

    c = params["select_component"]
    if c:
        rows = body_flex.select_rows(result.projections, c, params["select_min"], params["select_max"])
        if len(rows) == 0:
            raise ValueError(f"no particle has a coordinate on component {c} in [{params['select_min']}, "
                             f"{params['select_max']}] (the range is {coords[:, c - 1].min():.4g} to "
                             f"{coords[:, c - 1].max():.4g})")
        write_particles_star(out / "particles_selected.star", pset, extra_columns=columns, rows=rows)
        ctx.add("particles_star", "particles_selected.star", f"particles with component {c} in "
                f"[{params['select_min']}, {params['select_max']}] ({len(rows)} of {n})", n_particles=len(rows),
                subset="selected", component=c, low=params["select_min"], high=params["select_max"], **src)
        ctx.log.info("selected %d of %d particles along component %d", len(rows), n, c)


METHOD = Method(
    name="flex-analyse",
    order=55,
    title="Flexibility analysis of rigid bodies",
    help="As relion_flex_analyse: a PCA of a multibody run's body motions (6 numbers per body per particle, each "
         "column weighted by how much its unit step changes the body's density; optionally relative to one body, "
         "so that errors of the consensus poses drop out), the variance each component explains, histograms of the "
         "particles along every component, maps along the main components made by moving each body's map and mask "
         "and combining them without double-counting where masks overlap (Σ "
         "mask·map / max(Σ mask, 1)), and a selection of particles by a range along one component. Writes "
         "components.npy, particles.star (cryohetFlexComponent<k> columns), componentNNN/binNNN.mrc with a ChimeraX "
         "script, plots and particles_selected.star.",
    params=PARAMS,
    outputs=("latents", "particles_star", "volume_series", "chimerax", "plot"),
    run=run,
    citations=("Nakane T, Kimanius D, Lindahl E, Scheres SHW (2018) Characterisation of molecular motions in "
               "cryo-EM single-particle data by multi-body refinement in RELION. eLife 7:e36861.",),
)
