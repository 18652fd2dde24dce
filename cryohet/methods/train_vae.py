"""``cryohet train-vae``: a neural hyper-molecule V(z, k) with known poses, z inferred by an encoder (the VAE of
cryoDRGN) or by a per-particle latent table (an auto-decoder)."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods._pose_outputs import (
    POSE_PARAMS,
    pose_columns,
    pose_options,
    refined_particles,
    write_pose_changes,
)
from cryohet.methods.base import CACHE_PARAMS, Method, Param

#: ``--filters_from`` values besides covariance and a run folder
LEARNT, AUTO = "learnt", "auto"

PARAMS = (
    Param("particles", str, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("datadir", str, "", "Folder to look for the particle stacks in (empty: beside the particle file).",
          expert=True),
    Param("zdim", int, 8, "Latent dimension (number of conformational coordinates per particle).", min=1, max=256),
    Param("epochs", int, 20, "Training epochs (passes over the particles).", min=1),
    Param("batch_size", int, 16, "Particles per optimisation step, all GPUs/ranks together (a multiple of their "
          "number).", min=1),
    Param("lr", float, 1e-4, "Adam learning rate.", min=0.0),
    Param("beta", float, 1.0, "Weight β of the KL term of the ELBO: the KL of an image counts β / (2 × its fitted "
          "pixels) against the mean squared error of images normalised to unit RMS (β = 2 is the ELBO itself "
          "where the images are mostly noise); 0 means 1/zdim (cryoDRGN's default; at low SNR the latents then "
          "fit noise).", min=0.0),
    Param("beta_warmup", int, 2, "Epochs over which β rises geometrically from 1/zdim to --beta: a latent that "
          "carries signal forms in the first epochs, fitting noise takes longer; 0: β from the start.", min=0),
    Param("inference", str, "amortised", "How each particle's latent z is inferred: amortised (an encoder of the "
          "image, the VAE of cryoDRGN) or autodecoder (a free latent per particle, optimised with the volume, as "
          "3DFlex and DRGN-AI do; no encoder).", choices=("amortised", "autodecoder")),
    Param("latent_lr", float, 5e-2, "Adam learning rate of the per-particle latents (inference autodecoder).",
          min=0.0, expert=True),
    Param("enc_layers", int, 3, "Encoder hidden layers (inference amortised).", min=1, max=32),
    Param("enc_dim", int, 256, "Encoder layer width (inference amortised; cryoDRGN's large setting: 1024).", min=8,
          max=8192),
    Param("encoder_input", str, "auto", "What the encoder sees (inference amortised): residual (the image less the "
          "anchored base map's projection at its pose and CTF, phase-flipped: the consensus' pose-dependent "
          "projection removed; needs --anchor homogeneous), image (the phase-flipped image, cryoDRGN's) or auto "
          "(residual when the decoder is anchored, else image).", choices=("auto", "residual", "image")),
    Param("encoder_filters", int, 32, "Pose-aware encoder (inference amortised): the encoder reads its input (the "
          "residual or the image) as its responses to 3-D filter maps (--filters_from), each sliced at the image's "
          "pose and weighted by its CTF, so that a change of the molecule looks the same to it from every view; "
          "this many when they are learnt; 0: it reads the phase-flipped pixels (cryoDRGN's encoder), unless "
          "--filters_from names fixed maps.", min=0, max=1024),
    Param("filter_res_A", float, 20.0, "Resolution of the learnt filter maps or a run's, Å (their Fourier grid's "
          "radius is box × pixel size / this, at most the fitted circle); 0: the fitted circle.", min=0.0,
          expert=True),
    Param("filters_from", str, "auto", "The encoder's filter maps: covariance (the --covariance_filters leading "
          "eigenvectors of the residuals' covariance, estimated before the first epoch from up to 10,000 particles "
          "in 5 passes and held fixed; needs the residual, --anchor homogeneous; they find the motion at low SNR, "
          "about 0.1 and below, where learnt maps do not), learnt (--encoder_filters maps learnt with the "
          "networks; at high SNR their latent is the better), auto (covariance when the encoder reads the "
          "residual, else learnt; on resuming, what the run used) or a principal-volumes or moments run folder "
          "(its principal volumes, held fixed; the maps must span the particles' box, same box × pixel size).",
          expert=True),
    Param("covariance_filters", int, 3, "With --filters_from covariance: the number of eigenvectors.", min=1,
          max=64, expert=True),
    Param("covariance_res_A", float, 30.0, "With --filters_from covariance: the resolution of the eigenvectors, "
          "Å (at most the fitted circle; finer ones carry more noise than signal at low SNR).", min=0.0,
          expert=True),
    Param("learnt_filters", int, 0, "With --filters_from covariance: this many learnt maps at --filter_res_A beside "
          "the covariance filters, starting at zero, read only where the covariance's leading direction does not "
          "reproduce across two halves of the particles (its variance in one half less than 3 s.d. above a random "
          "direction's in the other: the filters hold noise, as at SNR 0.01); for a set of many unrelated "
          "particles (the consensus a blur), where they gain the most; on a set of one molecule's states at such "
          "SNR their latent is mostly noise and the maps lose a little. 0: none; on resuming, the run's own.",
          min=0, max=1024, expert=True),
    Param("dec_layers", int, 3, "Decoder hidden layers.", min=1, max=32),
    Param("dec_dim", int, 256, "Decoder layer width (cryoDRGN's large setting: 1024).", min=8, max=8192),
    Param("crop_box", int, 0, "Fourier-crop the images to this box on the fly, pixels (even; 0: keep the box). "
          "The pixel size grows by box/crop_box; 64-128 px is usual for training.", min=0),
    Param("res_limit_A", float, 0.0, "Fit only the frequencies up to this resolution, Å (the resolution circle; "
          "with --anchor homogeneous the maps are the homogeneous map between it and Nyquist, where the network "
          "learns nothing); 0: up to Nyquist of the (cropped) box.", min=0.0),
    Param("freq_march", float, 0.0, "Frequency marching: share of the epochs over which the fitted circle widens "
          "linearly from a quarter of the resolution circle's radius to all of it (the low frequencies are fitted "
          "first, those epochs evaluate the decoder on fewer pixels); 0: the whole circle from the start.", min=0.0,
          max=0.9),
    Param("anchor", str, "homogeneous", "Base of the decoder: homogeneous (the network learns a residual on "
          "--anchor_fraction × the homogeneous reconstruction of the same particles, FSC-weighted per shell, and "
          "starts at zero; the per-particle maps are then at least that map where the latents carry little) or none "
          "(the network is the whole map, cryoDRGN's decoder).", choices=("homogeneous", "none")),
    Param("anchor_fraction", float, 0.8, "With --anchor homogeneous: the base is this fraction of the homogeneous "
          "map and the network learns the rest of the mean with the latent's changes (below 1 its output is used "
          "from the first steps, so the latent forms as without an anchor; at 1 it forms slowly).", min=0.01,
          max=1.0),
    Param("anchor_particles", int, 50000, "With --anchor homogeneous: reconstruct the base from at most this many "
          "particles, drawn at random (--seed), so that a large set has no pass over all its images before the "
          "first epoch; 0: all particles.", min=0),
    Param("domain", str, "fourier", "Decoder output: fourier (real and imaginary parts on a half-space, Hermitian "
          "symmetry exact, half the evaluations) or hartley (one value per frequency, cryoDRGN's --domain hartley).",
          choices=("fourier", "hartley"), expert=True),
    Param("pe_type", str, "gaussian", "Positional encoding of the frequencies: gaussian (random Fourier features, "
          "cryoDRGN's default) or geom (geometric frequencies, survey equation 9).", choices=("gaussian", "geom"),
          expert=True),
    Param("pe_dim", int, 0, "Frequencies per axis of the positional encoding; 0: box/2.", min=0, expert=True),
    Param("feat_sigma", float, 0.5, "Width of the random Gaussian feature frequencies (pe_type gaussian).", min=0.0,
          expert=True),
    Param("activation", str, "relu", "Activation of the hidden layers.", choices=("relu", "leaky_relu"), expert=True),
    Param("window_radius", float, 0.85, "Soft circular window applied to the images, fraction of box/2 "
          "(0: none).", min=0.0, max=1.0, expert=True),
    Param("weight_decay", float, 0.0, "Adam weight decay.", min=0.0, expert=True),
    Param("amp", str, "auto", "Mixed precision (bfloat16; float16 with loss scaling on older GPUs): auto uses it on "
          "CUDA and on CPUs with native bfloat16, yes forces it, no keeps float32.", choices=("auto", "yes", "no"),
          expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its last checkpoint (written after "
          "every epoch; the one before is kept and used when the newest is damaged); --epochs is the new total."),
    Param("init_model", str, "", "Start from the weights of a trained model (a train-vae output folder or its "
          "model.safetensors); it must have the same box, pixel size and architecture.", expert=True),
    Param("chunk_images", int, 4096, "Images read from disk per block; memory ~ chunk_images × box² × 4 bytes.",
          min=1, expert=True),
    Param("prefetch", int, 4, "Prepared batches kept ready by the background reader (0: no background reader).",
          min=0, expert=True),
    *CACHE_PARAMS,
    *POSE_PARAMS,
)


def _model_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        from cryohet.errors import InputError
        from cryohet.record import read_record

        models = [o for o in read_record(p).of_kind("model") if o.meta.get("model_type") == "vae"]
        if not models:
            raise InputError(p, "the run folder holds no neural model (train-vae)")
        return p / models[0].path
    return p


def _linear_components(run: str, box_A: float) -> np.ndarray:
    """The principal volumes (K, b, b, b) of a principal-volumes or moments run whose maps span ``box_A`` Å."""
    from cryohet.errors import InputError
    from cryohet.models.base import load_volume_model
    from cryohet.models.linear import LinearModel

    model = load_volume_model(run)
    if not isinstance(model, LinearModel):
        raise InputError(run, "--filters_from needs a run of principal-volumes or moments (a linear model)")
    span = model.box * model.apix
    if abs(span - box_A) > 0.01 * box_A:
        raise InputError(run, f"its maps span {span:.1f} Å ({model.box} px at {model.apix:g} Å/px) but the "
                              f"particles' box spans {box_A:.1f} Å; run it on the same particles")
    return model.components


def _checkpoint_inference(out_dir: Path) -> dict[str, Any] | None:
    """The inference settings of the checkpoint that ``--resume`` continues from (None: no checkpoint). Fixed
    filters are kept in it, so a run they came from is not read again (it may have moved since)."""
    from cryohet.inference.trainer import CHECKPOINT_NAME
    from cryohet.io.weights import previous_path, read_metadata
    from cryohet.models.neural import stored_inference

    for path in (out_dir / CHECKPOINT_NAME, previous_path(out_dir / CHECKPOINT_NAME)):
        meta = read_metadata(path)
        if meta is not None and "inference" in meta:
            return stored_inference(meta)
    return None


def _filter_source(params: dict[str, Any], encoder_input: str, saved: dict[str, Any] | None) -> str:
    """Where the encoder's filters come from: covariance, learnt or a run folder; ``auto`` is covariance when
    the encoder reads the residual, else learnt, and on resuming the source of the filters of the checkpoint,
    whose inference settings are ``saved``. The pixels (``--encoder_filters 0``) count as learnt."""
    from cryohet.inference.amortised import COVARIANCE

    source = params["filters_from"]
    if source != AUTO:
        return source
    if saved is not None and saved.get("kind") == "amortised":
        return str(saved.get("filters_from", LEARNT))
    return COVARIANCE if encoder_input == "residual" and params["encoder_filters"] else LEARNT


def _filter_freq(max_freq: float, apix: float, res_A: float) -> float:
    """The filters' resolution circle, cycles/pixel: ``res_A`` Å within the fitted circle ``max_freq`` (0: it)."""
    return max_freq if res_A <= 0 else min(max_freq, apix / res_A)


def _plot_losses(path: Path, history: list[dict[str, float]]) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax = fig.subplots(1, 2)
    ax[0].plot(ep, [h["gen_loss"] for h in history], "o-")
    ax[0].set(xlabel="epoch", ylabel="reconstruction error (MSE)", title="reconstruction")
    ax[1].plot(ep, [h["kld"] for h in history], "o-", color="C1")
    ax[1].set(xlabel="epoch", ylabel="KL divergence (nats)", title="KL(q(z|x) || N(0, I))")
    save_png(fig, path, dpi=100)


def model_box_for(raw_box: int, crop_box: int) -> int:
    """The model's box: ``crop_box`` when set (even, not larger than the images), else the images' box."""
    if crop_box <= 0:
        return raw_box
    if crop_box % 2 or crop_box > raw_box:
        raise ValueError(f"--crop_box must be even and at most the image box ({raw_box} px), got {crop_box}")
    return crop_box


def run(params: dict[str, Any], ctx: Any) -> None:
    import logging
    import os

    from cryohet.atomic import atomic_path, save_npy
    from cryohet.inference.amortised import COVARIANCE
    from cryohet.inference.fit_neural import fit_neural
    from cryohet.inference.trainer import TrainOptions
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._fit_outputs import fit_columns, register_fit_plot
    from cryohet.models.neural import VolumeConfig, save_model
    from cryohet.validation.goodness import latent_predictors

    pset = load_particles(params["particles"], params["datadir"] or None)
    box = model_box_for(pset.box, params["crop_box"])
    apix = pset.apix * pset.box / box
    max_freq = 0.5 if params["res_limit_A"] <= 0 else min(0.5, apix / params["res_limit_A"])
    cfg = VolumeConfig(box=box, apix=apix, zdim=params["zdim"], dec_layers=params["dec_layers"],
                       dec_dim=params["dec_dim"], pe_type=params["pe_type"], pe_dim=params["pe_dim"],
                       feat_sigma=params["feat_sigma"], domain=params["domain"], max_freq=max_freq,
                       activation=params["activation"], seed=params["seed"],
                       anchor=params["anchor"] == "homogeneous", anchor_fraction=params["anchor_fraction"])
    filter_maps = None
    if params["inference"] == "amortised":
        inference = {"kind": "amortised", "enc_layers": params["enc_layers"], "enc_dim": params["enc_dim"]}
        encoder_input = params["encoder_input"]
        if encoder_input == "auto":
            encoder_input = "residual" if params["anchor"] == "homogeneous" else "image"
        if encoder_input != "image":  # image is not stored (checkpoints from before the option compare equal)
            inference["encoder_input"] = encoder_input
        filter_res_A = params["filter_res_A"]
        saved = _checkpoint_inference(Path(ctx.out_dir)) if params["resume"] else None
        source = _filter_source(params, encoder_input, saved)
        if source == COVARIANCE:
            inference["filters_from"] = COVARIANCE
            inference["encoder_filters"] = params["covariance_filters"]
            filter_res_A = params["covariance_res_A"]
        elif source != LEARNT:
            linear_run = str(Path(source).resolve())
            filter_maps = functools.cache(lambda: _linear_components(linear_run, box * apix))
            inference["filters_from"] = linear_run
            inference["encoder_filters"] = (int(saved["encoder_filters"])
                                            if saved and saved.get("filters_from") == linear_run
                                            else len(filter_maps()))
        elif params["encoder_filters"]:
            inference["encoder_filters"] = params["encoder_filters"]
        if "encoder_filters" in inference:
            inference["filter_freq"] = _filter_freq(max_freq, apix, filter_res_A)
        n_learnt = params["learnt_filters"] if saved is None else int(saved.get("learnt_filters", 0))
        if n_learnt and inference.get("filters_from") == COVARIANCE:
            inference["learnt_filters"] = n_learnt
            inference["learnt_filter_freq"] = _filter_freq(max_freq, apix, params["filter_res_A"])
        elif n_learnt:
            ctx.log.warning("--learnt_filters %d ignored: it adds learnt maps beside covariance filters, and the "
                            "encoder's filters are %s", n_learnt, inference.get("filters_from") or (
                                "learnt already" if "encoder_filters" in inference else "none (it reads pixels)"))
    elif params["filters_from"] not in (AUTO, LEARNT):
        raise ValueError("--filters_from sets the encoder's filters; the auto-decoder (--inference autodecoder) has "
                         "no encoder")
    else:
        inference = {"kind": "autodecoder", "n_particles": len(pset), "latent_lr": params["latent_lr"]}
    opts = TrainOptions.from_params(params)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        ctx.log.setLevel(logging.WARNING)
    init = _model_file(params["init_model"]) if params["init_model"] else None
    objective, res = fit_neural(pset, cfg, inference, opts, ctx.out_dir, ctx.device, ctx, beta=params["beta"],
                                window_radius=params["window_radius"], resume=params["resume"], init_model=init,
                                poses=pose_options(params), march=params["freq_march"],
                                beta_warmup=params["beta_warmup"], anchor_particles=params["anchor_particles"],
                                filter_maps=filter_maps)
    poses = getattr(objective, "poses", None)
    out = Path(ctx.out_dir)
    d = cfg.zdim
    if rank == 0:
        save_model(out / "model.safetensors", objective.decoder, objective.settings, objective.state_dict(),
                   {"history": json.dumps(res.history)})
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps({"model": asdict(cfg), "inference": objective.settings,
                                       "training": asdict(opts), "beta": params["beta"],
                                       "freq_march": params["freq_march"],
                                       "particles": str(Path(params["particles"]).resolve()),
                                       "n_particles": len(pset), "image_box": pset.box, "image_apix": pset.apix,
                                       "history": res.history}, indent=1))
        for name, arr in (("z.npy", res.z_mu), ("z_logvar.npy", res.z_logvar)):
            save_npy(out / name, arr)
        refined = refined_particles(pset, poses)
        fit = fit_columns(ctx, refined, *latent_predictors(objective.decoder, res.z_mu), box=cfg.box,
                          batch_size=params["batch_size"], amp=params["amp"], max_freq=cfg.max_freq)
        write_particles_star(out / "particles.star", refined,
                             extra_columns={**{f"cryohetZ{i + 1}": res.z_mu[:, i].astype(np.float64)
                                               for i in range(d)}, **(pose_columns(refined) if poses else {}), **fit})
        _plot_losses(out / "loss.png", res.history)
        if poses is not None:
            write_pose_changes(ctx, poses)
    # every rank registers the same outputs, so whichever writes the run record last lists them all
    ctx.add("model", "model.safetensors", f"neural volume and {objective.kind} inference weights",
            model_type="vae", latent_dim=d, box=cfg.box, apix=cfg.apix, config="config.json",
            inference=objective.kind)
    ctx.add("latents", "z.npy", f"latent means (N, {d})", logvar="z_logvar.npy", dim=d)
    ctx.add("particles_star", "particles.star", f"particles with cryohetZ1..{d}, goodness of fit (cryohetFitZ, "
            "cryohetResidualZ)" + (" and the refined poses" if poses is not None else ""),
            columns=[f"cryohetZ{i + 1}" for i in range(d)], refined_poses=poses is not None)
    ctx.add("plot", "loss.png", "training losses per epoch")
    if rank > 0:
        register_fit_plot(ctx)


METHOD = Method(
    name="train-vae",
    order=40,
    title="Train a neural model of the conformations: cryoDRGN-style VAE or auto-decoder (poses known)",
    help="Fits a neural hyper-molecule V(z, k) (an MLP over positional features of the 3-D frequency and the "
         "latent z) and an encoder of each particle image to q(z | image), by maximising the evidence lower bound "
         "with weight β on the KL term (cryoDRGN, survey section 7.2); with --inference autodecoder each particle "
         "has its own free q(z) instead of an encoder (3DFlex, DRGN-AI). CTF and origins are applied in the model; "
         "only frequencies inside the resolution circle are fitted. Writes the weights (safetensors), per-particle "
         "latent means and log-variances (z.npy, z_logvar.npy, rows in particle-file order), the particles STAR with "
         "cryohetZ1..d columns and each particle's goodness of fit (cryohetFitZ, cryohetResidualZ, fit_z.png), "
         "and a loss plot. With --refine_poses each particle's rotation and origin are "
         "refined with the model (SGD on per-particle corrections after a warm-up) and written into the STAR. "
         "A checkpoint is written after every epoch: --resume yes continues "
         "after a crash or kill. Several GPUs or nodes: launch with torchrun (each rank reads its own share).",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "plot"),
    run=run,
    citations=("Zhong, Bepler, Berger & Davis (2021) CryoDRGN: reconstruction of heterogeneous cryo-EM structures "
               "using neural networks. Nature Methods 18, 176-185.",),
)
