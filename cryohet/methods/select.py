"""``cryohet select``: particle subsets by cluster, latent-space region, index list or goodness of fit, as RELION
STAR files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.analysis import latent
from cryohet.analysis.runs import load_analysis, load_latents, particles_star_path
from cryohet.analysis.select import (
    REGION_SHAPES,
    cluster_mask,
    indices_mask,
    parse_clusters,
    parse_region,
    read_indices,
    region_mask,
)
from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.methods.base import Method, Param

PARAMS = (
    Param("run", Path, None, "Run folder of a heterogeneity method (its particles STAR and latents; for "
          "--max_fit_z / --max_residual_z alone any run whose particles STAR has those columns, reconstruct's "
          "too). May be left out with --analysis: the analysed run is used.", input_role="run"),
    Param("analysis", Path, None, "Folder of a 'cryohet analyze' run: its k-means labels (for --clusters), "
          "PCA and UMAP coordinates (for --region)."),
    Param("clusters", str, None, "Keep these k-means clusters (0-based numbers as in labels.npy, e.g. '0,3')."),
    Param("region", str, None, "Keep particles in a region: comma-separated <axis>:<low>:<high>, axis pcN "
          "(PC coordinate), zN (latent coordinate) or umapN (N from 1), e.g. 'pc1:-1:1,pc2:0:2'. An empty bound "
          "is open (box only)."),
    Param("region_shape", str, "box", "box: every axis within its bounds; ellipse: inside the axis-aligned "
          "ellipse(oid) inscribed in that box.", choices=REGION_SHAPES),
    Param("indices", Path, None, "Keep these rows: a text file of 0-based row numbers of the particles STAR "
          "(spaces, commas or new lines) or an .npy of integers (or a boolean mask)."),
    Param("max_fit_z", float, None, "Keep particles whose goodness of fit cryohetFitZ (noise standard deviations "
          "short of a typical particle's evidence; N(0, 1) for particles the model explains) is at most this; "
          "junk scores high. Needs a run that wrote the column (every method with a model of the images)."),
    Param("max_residual_z", float, None, "Keep particles whose cryohetResidualZ (the residual's χ² as a z-score "
          "against pure noise, noise standard deviations) is at most this."),
    Param("invert", bool, False, "Keep the particles that do NOT match."),
    Param("write_rest", bool, True, "Also write the other particles as particles_rest.star."),
)


#: goodness-of-fit cuts: parameter -> STAR column (written by ``validation.goodness`` through every method)
FIT_CUTS = {"max_fit_z": "cryohetFitZ", "max_residual_z": "cryohetResidualZ"}


def _run_folder(params: dict[str, Any], analysis: Any) -> Path:
    if params["run"] is not None:
        return Path(params["run"]).resolve()
    if analysis is None:
        raise ValueError("give --run (a heterogeneity run) or --analysis (an analyze run)")
    if analysis.run is None:
        raise InputError(analysis.folder, "the analyze run does not name the run it analysed: give --run")
    return analysis.run


def _check_length(arr: np.ndarray | None, n: int, what: str, folder: Path) -> None:
    if arr is not None and len(arr) != n:
        raise InputError(folder, f"{what} has {len(arr)} rows but the run has {n} particles: "
                                 "the analysis is of another run")


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.io.particles import load_particles, write_particles_star

    fit_cuts = {col: params[name] for name, col in FIT_CUTS.items() if params[name] is not None}
    if params["clusters"] is None and params["region"] is None and params["indices"] is None and not fit_cuts:
        raise ValueError("give at least one of --clusters, --region, --indices, --max_fit_z and --max_residual_z")
    analysis = load_analysis(params["analysis"]) if params["analysis"] is not None else None
    run_dir = _run_folder(params, analysis)
    star = particles_star_path(run_dir)
    pset = load_particles(star, require_poses=False)  # subsets need rows and images, not poses
    n = len(pset.table)
    z = None
    if params["clusters"] is not None or params["region"] is not None:
        z, z_path = load_latents(run_dir)
        if len(z) != n:
            raise InputError(star, f"{n} particles but the latents ({z_path}) have {len(z)} rows")
        ctx.log.info("run %s: %d particles, latent dimension %d", run_dir, n, z.shape[1])

    mask = np.ones(n, dtype=bool)
    criteria: dict[str, Any] = {}
    if params["clusters"] is not None:
        if analysis is None or analysis.labels is None:
            raise ValueError("--clusters needs --analysis: an analyze run with k-means (--ksample > 0)")
        _check_length(analysis.labels, n, "k-means labels", analysis.folder)
        clusters = parse_clusters(params["clusters"], int(analysis.k or analysis.labels.max() + 1))
        m = cluster_mask(analysis.labels, clusters)
        ctx.log.info("clusters %s: %d particles", ",".join(map(str, clusters)), int(m.sum()))
        mask &= m
        criteria["clusters"] = clusters
    if params["region"] is not None:
        terms = parse_region(params["region"])
        spaces: dict[str, np.ndarray | None] = {"z": z, "pc": None, "umap": None}
        if analysis is not None:
            _check_length(analysis.pca, n, "PCA coordinates", analysis.folder)
            _check_length(analysis.umap, n, "UMAP coordinates", analysis.folder)
            spaces.update(pc=analysis.pca, umap=analysis.umap)
        if spaces["pc"] is None and any(t.space == "pc" for t in terms):
            spaces["pc"] = latent.pca(z).transform(z)
        m = region_mask(terms, {k: v for k, v in spaces.items() if v is not None}, params["region_shape"])
        ctx.log.info("region %s (%s): %d particles", ",".join(map(str, terms)), params["region_shape"], int(m.sum()))
        mask &= m
        criteria["region"] = ",".join(map(str, terms))
        criteria["region_shape"] = params["region_shape"]
    if params["indices"] is not None:
        idx = read_indices(params["indices"], n)
        ctx.log.info("indices from %s: %d particles", params["indices"], len(idx))
        mask &= indices_mask(idx, n)
        criteria["indices"] = str(Path(params["indices"]).resolve())
    for col, limit in fit_cuts.items():
        if col not in pset.table.columns:
            raise InputError(star, f"no {col} column: the run did not score its particles' goodness of fit")
        m = np.asarray(pset.table[col], dtype=np.float64) <= limit
        ctx.log.info("%s at most %g: %d particles", col, limit, int(m.sum()))
        mask &= m
        criteria[f"max_{col}"] = limit
    if params["invert"]:
        mask = ~mask
        criteria["invert"] = True

    rows = np.flatnonzero(mask)
    rest = np.flatnonzero(~mask)
    if len(rows) == 0:
        raise ValueError(f"empty selection: no particle matches ({', '.join(f'{k}={v}' for k, v in criteria.items())})")
    ctx.log.info("selected %d of %d particles", len(rows), n)
    meta = {"source_run": str(run_dir), "source_star": str(star.resolve()), **criteria}
    write_particles_star(ctx.out_dir / "particles_selected.star", pset, rows=rows)
    with atomic_path(ctx.out_dir / "selected_indices.txt") as tmp:
        np.savetxt(tmp, rows, fmt="%d", header="0-based rows of the run's particles STAR")
    ctx.add("particles_star", "particles_selected.star", f"selected particles ({len(rows)} of {n})",
            n_particles=int(len(rows)), subset="selected", **meta)
    if params["write_rest"] and len(rest):
        write_particles_star(ctx.out_dir / "particles_rest.star", pset, rows=rest)
        ctx.add("particles_star", "particles_rest.star", f"other particles ({len(rest)} of {n})",
                n_particles=int(len(rest)), subset="rest", **meta)
    elif params["write_rest"]:
        ctx.log.info("every particle is selected: no particles_rest.star")


METHOD = Method(
    name="select",
    order=70,
    title="Select particle subsets",
    help="Write particle subsets of a heterogeneity run as RELION 3.1 STAR files that point at the original "
         "images: by k-means cluster (of an analyze run), by a region of PC, latent or UMAP coordinates, or by "
         "a list of row indices, or by goodness of fit (--max_fit_z, --max_residual_z: cut junk on the "
         "cryohetFitZ and cryohetResidualZ columns that the methods write); criteria given together must all hold. "
         "Output: particles_selected.star, particles_rest.star, selected_indices.txt.",
    params=PARAMS,
    outputs=("particles_star",),
    run=run,
)
