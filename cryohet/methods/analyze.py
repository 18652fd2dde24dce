"""``cryohet analyze``: PCA, UMAP and k-means of a run's latents, maps at cluster centres and along PCs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path, save_npy
from cryohet.errors import InputError
from cryohet.methods.base import Method, Param

TITLE = "cryohet analyze"  # of its ChimeraX scripts

PARAMS = (
    Param("run", Path, None, "Run folder of a heterogeneity method (its latents and model of the volumes).",
          required=True, input_role="run"),
    Param("ksample", int, 20, "Number of k-means clusters; maps are made at their centres, snapped to the "
          "nearest particle latent (on-data). 0: no k-means.", min=0),
    Param("pcs", int, 2, "Number of principal components to traverse (maps along each). 0: none.", min=0),
    Param("n_frames", int, 10, "Maps per PC traversal.", min=2),
    Param("pc_low_pct", float, 5.0, "PC traversal start: this percentile of the PC coordinate (%).",
          min=0, max=100, expert=True),
    Param("pc_high_pct", float, 95.0, "PC traversal end: this percentile of the PC coordinate (%).",
          min=0, max=100, expert=True),
    Param("pc_on_data", bool, False, "Snap every PC traversal point to the nearest particle latent.", expert=True),
    Param("volumes", bool, True, "Generate maps (needs the run's model); no: only statistics and plots."),
    Param("umap", bool, True, "Compute a UMAP embedding when the latent space has more than 2 dimensions."),
    Param("umap_max_points", int, 50000, "Fit UMAP on at most this many particles (random subset); the "
          "others are placed with UMAP's transform.", min=10, expert=True),
    Param("umap_neighbors", int, 15, "UMAP n_neighbors.", min=2, expert=True),
    Param("umap_min_dist", float, 0.1, "UMAP min_dist.", min=0.0, expert=True),
    Param("latents", Path, None, "Use these latents (.npy (N, d), particles-STAR order) instead of the run's.",
          expert=True),
    Param("batch", int, 1, "Maps computed per model call (memory: batch·box³·4 bytes).", min=1, expert=True),
)


def _write_classes(ctx: Any, run_dir: Path, labels: np.ndarray, k: int, name: str) -> None:
    """The run's particles STAR with ``rlnClassNumber`` = k-means cluster + 1, in ``<out>/<name>/``."""
    from cryohet.analysis.runs import particles_star_path
    from cryohet.io.particles import load_particles, write_particles_star

    try:
        star = particles_star_path(run_dir)
    except InputError as exc:
        ctx.log.info("no particles STAR with classes: %s", exc)
        return
    pset = load_particles(star, require_poses=False)
    if len(pset) != len(labels):
        raise InputError(star, f"{len(pset)} particles but the latents have {len(labels)} rows")
    write_particles_star(ctx.out_dir / name / "particles.star", pset, extra_columns={"rlnClassNumber": labels + 1})
    ctx.add("particles_star", f"{name}/particles.star", f"particles with their k-means cluster as "
            f"rlnClassNumber (1..{k})", content="classes", k=k)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis import latent, plots
    from cryohet.analysis.runs import load_latents
    from cryohet.analysis.volumes import write_series
    from cryohet.models.base import load_volume_model

    run_dir = Path(params["run"]).resolve()
    z, z_path = load_latents(run_dir, params["latents"])
    n, d = z.shape
    ctx.log.info("latents: %d particles, %d dimension(s), from %s", n, d, z_path)
    src = {"source_run": str(run_dir), "source_latents": str(Path(z_path).resolve())}
    model = None
    if params["volumes"] and (params["ksample"] > 0 or params["pcs"] > 0):
        model = load_volume_model(run_dir)
        if model.latent_dim != d:
            raise ValueError(f"the run's model has {model.latent_dim} latent dimension(s) but the latents have {d}")
        ctx.log.info("model of the volumes: box %d, %.4g Å/pixel", model.box, model.apix)
    elif not params["volumes"]:
        ctx.log.info("no maps (--volumes no)")
    if params["pc_low_pct"] > params["pc_high_pct"]:
        raise ValueError("--pc_low_pct must not exceed --pc_high_pct")

    # PCA
    pcs = latent.pca(z)
    coords = pcs.transform(z).astype(np.float32)
    save_npy(ctx.out_dir / "pca.npy", coords)
    ratio = pcs.explained_variance_ratio
    ctx.log.info("PCA explained variance ratio: %s", ", ".join(f"{r:.3f}" for r in ratio))
    ctx.add("latents", "pca.npy", "PCA coordinates of the latents", content="pca",
            explained_variance_ratio=ratio.round(6).tolist(), mean=pcs.mean.round(6).tolist(),
            components=pcs.components.round(6).tolist(), **src)
    pc_lab = [f"PC{i + 1} ({100 * r:.1f}%)" for i, r in enumerate(ratio)]
    xy = coords[:, :2]
    ylab = pc_lab[1] if d > 1 else ""
    ctx.add("plot", plots.scatter_plot(xy, ctx.out_dir / "pca.png", xlabel=pc_lab[0], ylabel=ylab,
                                       title=f"PCA of the latents ({n} particles)"), "PCA of the latents")
    ctx.add("plot", plots.density_plot(xy, ctx.out_dir / "pca_density.png", xlabel=pc_lab[0], ylabel=ylab,
                                       title="PCA density"), "PCA density")

    # UMAP
    emb = None
    if not params["umap"]:
        ctx.log.info("UMAP: skipped (--umap no)")
    elif d <= 2:
        ctx.log.info("UMAP: skipped, the latent space has %d dimension(s) (plots of the latents/PCs suffice)", d)
    elif n < 10:
        ctx.log.info("UMAP: skipped, only %d particles", n)
    else:
        emb, fit_rows = latent.umap_embedding(z, params["umap_neighbors"], params["umap_min_dist"],
                                              params["umap_max_points"], ctx.seed, log=ctx.log.info)
        save_npy(ctx.out_dir / "umap.npy", emb)
        ctx.add("latents", "umap.npy", "UMAP of the latents", content="umap", fitted_on=int(len(fit_rows)),
                n_neighbors=params["umap_neighbors"], min_dist=params["umap_min_dist"], **src)
        ctx.add("plot", plots.scatter_plot(emb, ctx.out_dir / "umap.png", xlabel="UMAP1", ylabel="UMAP2",
                                           title=f"UMAP of the latents ({n} particles)"), "UMAP of the latents")
        ctx.add("plot", plots.density_plot(emb, ctx.out_dir / "umap_density.png", xlabel="UMAP1",
                                           ylabel="UMAP2", title="UMAP density"), "UMAP density")

    # k-means
    k = params["ksample"]
    if k > 0:
        if k > n:
            raise ValueError(f"--ksample {k} exceeds the number of particles ({n})")
        km = latent.kmeans(z, k, seed=ctx.seed)
        name = f"kmeans{k}"
        folder = ctx.out_dir / name
        folder.mkdir(exist_ok=True)
        save_npy(folder / "labels.npy", km.labels.astype(np.int32))
        with atomic_path(folder / "centers.txt") as tmp:
            np.savetxt(tmp, km.centers, fmt="%.6g",
                       header=f"on-data k-means centres (latent coordinates), one per cluster 0..{k - 1}")
        with atomic_path(folder / "centers_ind.txt") as tmp:
            np.savetxt(tmp, km.center_indices, fmt="%d", header="0-based row (particles STAR / latents) of each centre")
        sizes = np.bincount(km.labels, minlength=k)
        ctx.log.info("k-means (K=%d): cluster sizes %s", k, " ".join(map(str, sizes)))
        ctx.add("latents", f"{name}/labels.npy", f"k-means labels (K={k})", content="kmeans_labels", k=k,
                center_indices=km.center_indices.tolist(), sizes=sizes.tolist(), **src)
        _write_classes(ctx, run_dir, km.labels, k, name)
        cxy = pcs.transform(km.centers)[:, :2]
        ctx.add("plot", plots.scatter_plot(xy, folder / "pca.png", labels=km.labels, centers=cxy,
                                           xlabel=pc_lab[0], ylabel=ylab, title=f"k-means (K={k}) on PCA"),
                f"k-means (K={k}) on PCA")
        if emb is not None:
            ctx.add("plot", plots.scatter_plot(emb, folder / "umap.png", labels=km.labels,
                                               centers=emb[km.center_indices], xlabel="UMAP1", ylabel="UMAP2",
                                               title=f"k-means (K={k}) on UMAP"), f"k-means (K={k}) on UMAP")
        if model is not None:
            write_series(ctx, model, km.centers, name, f"map at a k-means centre (K={k})", params["batch"],
                         per_map={"cluster": list(range(k)), "particle_index": km.center_indices.tolist()},
                         title=TITLE, k=k)

    # PC traversals
    for i in range(min(params["pcs"], d)):
        name = f"pc{i + 1}"
        pts, vals = latent.pc_traversal(z, pcs, i, params["n_frames"], (params["pc_low_pct"], params["pc_high_pct"]))
        per_map: dict[str, list[Any]] = {"pc_value": vals.round(6).tolist()}
        if params["pc_on_data"]:
            pts, idx = latent.snap_to_data(z, pts)
            per_map["particle_index"] = idx.tolist()
        folder = ctx.out_dir / name
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / "z_values.txt") as tmp:
            np.savetxt(tmp, pts, fmt="%.6g", header=f"latent points along {pc_lab[i]}")
        ctx.add("plot", plots.scatter_plot(xy, folder / "pca.png", xlabel=pc_lab[0], ylabel=ylab,
                                           points=pcs.transform(pts)[:, :2], points_label=f"{name} traversal",
                                           title=f"{name} traversal ({params['pc_low_pct']:g}th to "
                                                 f"{params['pc_high_pct']:g}th percentile)"),
                f"{name} traversal on PCA")
        if model is not None:
            write_series(ctx, model, pts, name, f"map along {pc_lab[i]}", params["batch"], per_map, title=TITLE,
                         pc=i + 1)
    if params["pcs"] > d:
        ctx.log.info("only %d PC(s) exist; traversed %d", d, d)


METHOD = Method(
    name="analyze",
    order=50,
    title="Analyse a latent space",
    help="PCA and UMAP of a run's per-particle latents, k-means clustering, maps at the cluster centres "
         "(snapped to real particles) and along the principal directions (map series), latent plots (PNG) and "
         "ChimeraX scripts to view the series. Output: pca.npy, pca.png, umap.npy, umap.png, "
         "kmeans<K>/{labels.npy,centers.txt,centers_ind.txt,vol_XXX.mrc,kmeans<K>.cxc,particles.star}, "
         "pc<i>/{vol_XXX.mrc,...}. kmeans<K>/particles.star is the run's particles with the cluster as "
         "rlnClassNumber (1..K): classes in Scipion, or split it by class in RELION.",
    params=PARAMS,
    outputs=("latents", "volume_series", "plot", "chimerax", "particles_star"),
    run=run,
    citations=("Zhong et al. (2021) CryoDRGN: reconstruction of heterogeneous cryo-EM structures using neural "
               "networks. Nat Methods 18:176-185.",
               "McInnes, Healy, Melville (2018) UMAP: Uniform Manifold Approximation and Projection. "
               "arXiv:1802.03426."),
)
