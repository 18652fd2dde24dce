"""What ``cryohet train-deform`` writes after training: latents, maps, the canonical map, displacement fields, plots
and the report. (A ``_`` module: not a method.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TERM_TITLES = {"data": "data (MSE per pixel)", "rigidity": "rigidity ‖JᵀJ − I‖²",
               "drift": "amplitude drift ‖w − w0‖² / ‖w0‖²"}


def _plot_terms(path: Path, terms: list[dict[str, float]], weights: list[float]) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    ep = [h["epoch"] for h in terms]
    fig = Figure(figsize=(11, 3.3), layout="constrained")
    for j, (ax, key) in enumerate(zip(fig.subplots(1, 3), TERM_TITLES, strict=True)):
        ax.plot(ep, [h[key] for h in terms], "o-", color=f"C{j}")
        ax.set(xlabel="epoch", title=TERM_TITLES[key] + (f" (weight {weights[j - 1]:.3g})" if j else ""))
    save_png(fig, path, dpi=100)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def write_outputs(ctx: Any, params: dict[str, Any], pset: Any, decoder: Any, objective: Any, res: Any,
                  terms: list[dict[str, float]], canon: Any, consensus: np.ndarray) -> None:
    """Latents and particles STAR, maps along PC1 and at k-means centres, the refined canonical map and its mask,
    the canonical points' displacements along PC1 (.npy, multi-model PDB, ChimeraX), plots and the report."""
    from cryohet.analysis import plots
    from cryohet.analysis.latent import kmeans, pc_traversal, pca
    from cryohet.analysis.normal_modes import write_mode_chimerax
    from cryohet.analysis.volumes import write_series
    from cryohet.atomic import save_npy
    from cryohet.geometry.gaussians import gaussian_map, lowpass_map
    from cryohet.io.atomic_model import box_centre_A, write_models
    from cryohet.io.mrc import write_map
    from cryohet.methods._latent_outputs import write_latents

    out = Path(ctx.out_dir)
    z, d = res.z_mu.astype(np.float64), params["zdim"]
    write_latents(ctx, pset, {"z.npy": res.z_mu, "z_logvar.npy": res.z_logvar}, z, f"latent means (N, {d})",
                  f"particles with cryohetZ1..{d}", poses=objective.poses, fit_model=decoder,
                  logvar="z_logvar.npy")
    pcs = pca(z, min(2, d))
    points, pc_values = pc_traversal(z, pcs, 0, params["n_maps"])
    title = f"cryohet train-deform ({params['field']})"
    series = write_series(ctx, decoder, points, "pc1", "map along PC1", per_map={"pc_value": pc_values.tolist()},
                          title=title, pc=1)
    if params["n_clusters"]:
        km = kmeans(z, min(params["n_clusters"], len(z)), seed=params["seed"])
        write_series(ctx, decoder, km.centers, "clusters", f"map at a k-means centre (K={km.k})",
                     per_map={"cluster": list(range(km.k)), "particle_index": km.center_indices.tolist()},
                     title=title, k=km.k)
        save_npy(out / "cluster_labels.npy", km.labels.astype(np.int64))
    xy = pcs.transform(z)
    ctx.add("plot", plots.scatter_plot(xy, out / "latent_pca.png", xlabel="PC1", ylabel="PC2" if d > 1 else "",
                                       points=pcs.transform(points)[:, :2] if d > 1 else None,
                                       points_label="PC1 traversal", title="latent means"),
            "latent means on their principal components, with the PC1 traversal")
    # the canonical map (refined), its mask, its starting fit
    apix, box, centre = decoder.apix, decoder.box, box_centre_A(decoder.box, decoder.apix)
    canonical = decoder.canonical_map()
    write_map(out / "canonical_map.mrc", canonical, apix)
    write_map(out / "mask.mrc", canon.mask.astype(np.float32), apix)
    ctx.add("volume", "canonical_map.mrc", "refined canonical map (the undeformed points)")
    ctx.add("mask", "mask.mrc", "mask of the canonical map's points")
    low = lowpass_map(torch.as_tensor(consensus, dtype=torch.float64), apix, decoder.resolution_A).numpy()
    start = gaussian_map(canon.atoms.xyz_A, decoder.amplitude0.cpu().double().numpy(), box, apix,
                         decoder.resolution_A, centre)
    # displacements of the canonical points along PC1: .npy, the points as a multi-model PDB, a ChimeraX movie
    with torch.no_grad():
        disp = decoder.displacements(torch.as_tensor(points, dtype=torch.float32)).double().numpy()
    for name, arr in (("pc1_displacements.npy", disp.astype(np.float32)),
                      ("canonical_points.npy", canon.atoms.xyz_A.astype(np.float32))):
        save_npy(out / name, arr)
    write_models(out / "pc1_points.pdb", decoder.atoms, decoder.atoms.xyz_A + disp)
    ctx.add("atomic_model", "pc1_points.pdb", f"the canonical points moved along PC1 ({params['n_maps']} models)",
            pc=1, displacements="pc1_displacements.npy", points="canonical_points.npy")
    ctx.add("chimerax", write_mode_chimerax(out / "pc1_motion.cxc", out / "pc1_points.pdb", series.files,
                                            series.level, f"{title}: the canonical points and maps along PC1"),
            "ChimeraX: the canonical points moving along PC1 beside its maps", series="pc1")
    weights = objective.restraint_weight.tolist()
    _plot_terms(out / "terms.png", terms, weights)
    ctx.add("plot", "terms.png", "data term, rigidity and amplitude drift per epoch")
    rms = np.sqrt((disp ** 2).sum(-1).mean(-1))
    summary = {"model": decoder.describe(), "n_particles": len(pset),
               "consensus_fit": {"relative_residual": canon.fit.residual, "cg_iterations": canon.fit.iterations,
                                 "correlation_start": _correlation(start, low),
                                 "correlation_refined": _correlation(canonical, low)},
               "regulariser_weights": {"rigidity": weights[0], "drift": weights[1],
                                       "factors": [params["rigidity_weight"], params["drift_weight"]]},
               "pc1_values": pc_values.tolist(), "pc1_displacement_rms_A": rms.tolist(),
               "history": res.history, "terms": terms, "epoch_seconds": res.epoch_seconds}
    ctx.write_report(json.dumps(summary, indent=1), "fit of the consensus, regulariser weights, terms per epoch, "
                     "displacements along PC1", name="deform_fit.json", history="restraint_history.json")
    ctx.log.info("canonical map vs the low-passed consensus: correlation %.4f at the start, %.4f refined; RMS "
                 "displacement along PC1 up to %.2f Å", summary["consensus_fit"]["correlation_start"],
                 summary["consensus_fit"]["correlation_refined"], float(rms.max()))
