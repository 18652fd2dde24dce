"""``cryohet abinit-het``: a conformational model and every particle's pose from images with CTF and no poses
(cryoDRGN2's ``abinit_het`` class): consensus ab initio, then training of the VAE alternated with pose re-search
against the model's slice at each image's latent."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods import abinit as _abinit
from cryohet.methods import train_vae as _vae
from cryohet.methods.base import Method, Param

_FROM_ABINIT = [p for p in _abinit.PARAMS if p.name not in ("resume", "batch_size")]
#: train-vae's β defaults to 1 with its decoder anchored on the homogeneous map; abinit-het's decoder is not
#: anchored (its consensus changes with the poses), so it keeps cryoDRGN's 1/zdim
_BETA = Param("beta", float, 0.0, "Weight β of the KL term of the ELBO; 0 means 1/zdim (cryoDRGN's default).",
              min=0.0)
_FROM_VAE = [_BETA if p.name == "beta" else p
             for p in _vae.PARAMS if p.name in ("zdim", "lr", "beta", "inference", "latent_lr", "enc_layers", "enc_dim",
                                                "dec_layers", "dec_dim", "crop_box", "window_radius", "amp", "cache",
                                                "cache_dir")]

PARAMS = (
    *_FROM_ABINIT,
    *_FROM_VAE,
    Param("rounds", int, 2, "Pose re-searches: each follows --epochs of training with the poses fixed; a last "
          "--epochs of training on the final poses follows the last one.", min=0, max=100),
    Param("epochs", int, 10, "Training epochs (passes over the particles) before each pose re-search and after the "
          "last.", min=1),
    Param("train_batch_size", int, 32, "Particles per optimisation step of the training.", min=1),
    Param("search_angle_deg", float, 8.0, "The re-search looks for each rotation within this angle of the current "
          "one, degrees (a shrinking grid of 27 rotations per step; 4 steps).", min=0.5, max=45.0),
    Param("search_shift_A", float, 4.0, "The re-search looks for each origin within this distance of the current "
          "one, Å.", min=0.0),
    Param("search_high_A", float, 0.0, "The re-search scores frequencies below 1 / this, Å (each decoder evaluation "
          "costs: a lower band limit is faster); 0: the model's whole resolution circle.", min=0.0),
    Param("n_maps", int, 10, "Maps written along the first principal component of the latents (5th to 95th "
          "percentile).", min=2, max=100),
    Param("batch_size", int, 64, "Images per batch of the consensus' and the re-search's pose searches.", min=1,
          expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoints (the consensus', "
          "written after every iteration; the training's, after every epoch; het_state.safetensors, after every "
          "re-search). The settings must be the same."),
)


def _plot_history(path: Path, consensus_history: list[dict[str, Any]], train_history: list[dict[str, Any]],
                  rounds: list[dict[str, Any]]) -> Path:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([h["iteration"] for h in consensus_history], [h["resolution_A"] for h in consensus_history], "o-")
    ax1.set(xlabel="consensus iteration", ylabel="half-map FSC 0.143 (Å)", title="consensus")
    ax1.invert_yaxis()
    ax2.plot([h["epoch"] for h in train_history], [h["gen_loss"] for h in train_history], "o-")
    for r in rounds:
        ax2.axvline(r["epoch"] + 0.5, color="0.6", ls="--")
    ax2.set(xlabel="epoch (dashed: pose re-search)", ylabel="reconstruction error (MSE)", title="training")
    return save_png(fig, path)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis.latent import pc_traversal, pca
    from cryohet.analysis.volumes import write_series
    from cryohet.atomic import atomic_path
    from cryohet.geometry.euler import matrix_to_euler
    from cryohet.inference.abinit_het import HetSettings, fit_abinit_het
    from cryohet.inference.decoder_poses import ResearchSettings
    from cryohet.inference.trainer import TrainOptions
    from cryohet.io.particles import write_particles_star
    from cryohet.methods._latent_outputs import write_latents
    from cryohet.models.neural import VolumeConfig, save_model

    pset, settings, reference, half = _abinit.prepare(params, ctx)
    box = _vae.model_box_for(pset.box, params["crop_box"])
    cfg = VolumeConfig(box=box, apix=pset.apix * pset.box / box, zdim=params["zdim"], dec_layers=params["dec_layers"],
                       dec_dim=params["dec_dim"], seed=params["seed"])
    if params["inference"] == "amortised":
        inference = {"kind": "amortised", "enc_layers": params["enc_layers"], "enc_dim": params["enc_dim"]}
    else:
        inference = {"kind": "autodecoder", "n_particles": len(pset), "latent_lr": params["latent_lr"]}
    opts = TrainOptions.from_params(params, epochs=(params["rounds"] + 1) * params["epochs"],
                                    batch_size=params["train_batch_size"])
    search = ResearchSettings(params["search_angle_deg"], params["search_shift_A"],
                              band_limit_A=params["search_high_A"], amp=params["amp"],
                              batch_size=params["batch_size"])
    het = HetSettings(params["rounds"], params["epochs"], search)
    out = Path(ctx.out_dir)
    fit = fit_abinit_het(pset, half, settings, het, cfg, inference, opts, out, ctx.device, ctx, beta=params["beta"],
                         window_radius=params["window_radius"], reference=reference, seed=ctx.seed,
                         resume=params["resume"])
    cons = fit.consensus
    euler0 = matrix_to_euler(cons.rotations.astype(np.float64))
    _abinit.write_maps(ctx, cons, "consensus map (hand undetermined)")
    obj, res = fit.objective, fit.result
    save_model(out / "model.safetensors", obj.decoder, obj.settings, obj.state_dict(),
               {"history": json.dumps(res.history)})
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps({"model": asdict(cfg), "inference": obj.settings, "training": asdict(opts),
                                   "beta": params["beta"], "particles": str(Path(params["particles"]).resolve()),
                                   "n_particles": len(pset), "image_box": pset.box, "image_apix": pset.apix,
                                   "history": res.history, "rounds": fit.history}, indent=1))
    ctx.add("model", "model.safetensors", f"neural volume and {obj.kind} inference weights", model_type="vae",
            latent_dim=cfg.zdim, box=cfg.box, apix=cfg.apix, config="config.json", inference=obj.kind)
    posed = _abinit.with_poses(pset, fit.euler_deg, fit.shift_A)
    d = cfg.zdim
    write_latents(ctx, posed, {"z.npy": res.z_mu, "z_logvar.npy": res.z_logvar}, res.z_mu,
                  f"latent means (N, {d})", f"particles with the poses found (RELION conventions) and "
                  f"cryohetZ1..{d}", extra_columns=_abinit.pose_columns(posed, half),
                  star_meta={"poses": True, "n": len(pset)}, fit_model=obj.decoder, fit_amp=params["amp"],
                  logvar="z_logvar.npy")
    write_particles_star(out / "particles_consensus.star", _abinit.with_poses(pset, euler0, cons.shifts_A),
                         extra_columns=_abinit.pose_columns(_abinit.with_poses(pset, euler0, cons.shifts_A), half))
    ctx.add("particles_star", "particles_consensus.star", "particles with the consensus poses (before the "
            "re-searches)", n=len(pset))
    z = res.z_mu.astype(np.float64)
    pcs = pca(z, min(2, d))
    pts, vals = pc_traversal(z, pcs, 0, params["n_maps"])
    write_series(ctx, obj.decoder, pts, "pc1", "map along PC1", per_map={"pc_value": vals.round(6).tolist()},
                 title="cryohet abinit-het", pc=1)
    _plot_history(out / "history.png", cons.history, res.history, fit.history)
    ctx.add("plot", "history.png", "consensus resolution per iteration; training loss per epoch with the pose "
            "re-searches")
    for r in fit.history:
        ctx.log.info("re-search %d: median rotation change %.2f°", r["round"], r["median_moved_deg"])


METHOD = Method(
    name="abinit-het",
    order=23,
    title="Heterogeneous ab initio: a conformational model and poses from images without poses",
    help="From particles with CTF and no poses: a consensus ab initio reconstruction (as cryohet abinit) gives a map "
         "and first poses; then the neural model of cryohet train-vae (decoder and encoder, or latent table) is "
         "trained with the poses fixed, alternated --rounds times with a local re-search of every image's rotation "
         "and origin against the model's slice at the image's own latent (cryoDRGN2's search against V(z, ·)), and "
         "trained once more on the final poses. Writes map.mrc, half1.mrc, half2.mrc and fsc.star (the consensus), "
         "model.safetensors (analyze, eval-volume and benchmark-score read it as train-vae's), z.npy, "
         "particles.star with the final poses in RELION's conventions and cryohetZ1..d, maps along PC1 and plots. "
         "The hand is undetermined.",
    params=PARAMS,
    outputs=("volume", "half_map", "fsc", "model", "latents", "particles_star", "volume_series", "chimerax", "plot"),
    run=run,
    needs_poses=False,
    citations=("Zhong ED, Lerer A, Davis JH, Berger B (2021) CryoDRGN2: ab initio neural reconstruction of 3D "
               "protein structures from real cryo-EM images. ICCV 4066-4075.",
               "Zhong, Bepler, Berger & Davis (2021) CryoDRGN: reconstruction of heterogeneous cryo-EM structures "
               "using neural networks. Nature Methods 18, 176-185."),
)
