"""Fitting a neural volume with a chosen inference strategy: data scale, resume and initial weights, the trainer.

The strategies (``INFERENCES``) differ only in how q(z) of a particle is given: an encoder of its image
(``amortised``, the VAE) or a free per-particle table (``autodecoder``). Both train the same volume on the same
prepared data through the same :class:`~cryohet.inference.trainer.Trainer`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cryohet.data.prepare import ImagePreparer, transform_rms
from cryohet.distributed import setup_distributed
from cryohet.errors import InputError
from cryohet.geometry.lattice import Lattice
from cryohet.inference.amortised import AmortisedInference
from cryohet.inference.autodecoder import AutoDecoderInference
from cryohet.inference.memory_plans import VaeShape, check_vae_fits
from cryohet.inference.pose_filters import filter_shape
from cryohet.inference.pose_tables import PoseCorrections
from cryohet.inference.trainer import (
    Checkpoint,
    Hooks,
    Trainer,
    TrainOptions,
    TrainResult,
    resume_point,
)
from cryohet.models.neural import VolumeConfig, read_model, stored_inference
from cryohet.reconstruct.homogeneous import fsc_weighted_reconstruction, particle_halves

INFERENCES: dict[str, type[nn.Module]] = {c.kind: c for c in (AmortisedInference, AutoDecoderInference)}


def check_compatible(cfg: VolumeConfig, other: VolumeConfig, source: Path) -> None:
    """Refuse weights of another box, pixel size or architecture."""
    if cfg.box != other.box:
        raise InputError(source, f"the model was trained at a box of {other.box} px but the particles give "
                                 f"{cfg.box} px (after --crop_box); use the same box")
    if abs(cfg.apix - other.apix) > 1e-3 * other.apix:
        raise InputError(source, f"the model was trained at {other.apix:g} Å/pixel but the particles give "
                                 f"{cfg.apix:g} Å/pixel")
    a, b = cfg.architecture(), other.architecture()
    diff = [f"{k}: {b[k]} (model) vs {a[k]} (asked)" for k in a if a[k] != b[k]]
    if diff:
        raise InputError(source, "the model's architecture differs from the one asked for: " + "; ".join(diff))


def _check_settings(asked: dict[str, Any], saved: dict[str, Any], source: Path, what: str) -> None:
    keys = [k for k in {**saved, **asked} if k != "latent_lr"]  # learning rates may change on resuming
    diff = [f"{k}: {saved.get(k)!r} ({what}) vs {asked.get(k)!r} (asked)" for k in keys
            if saved.get(k) != asked.get(k)]
    if diff:
        raise InputError(source, f"the {what}'s inference differs from the one asked for: " + "; ".join(diff))


def fit_neural(pset: Any, cfg: VolumeConfig, inference: dict[str, Any], opts: TrainOptions, out_dir: str | Path,
               device: torch.device | str = "cpu", ctx: Any | None = None, *, beta: float = 0.0,
               window_radius: float = 0.85, norm_sample: int = 1000, resume: bool = False,
               init_model: str | Path | None = None, poses: dict[str, Any] | None = None, march: float = 0.0,
               beta_warmup: int = 0, anchor_particles: int = 0,
               filter_maps: Callable[[], np.ndarray] | None = None) -> tuple[nn.Module, TrainResult]:
    """Train the volume ``cfg`` (its box and pixel size those of the cropped images) with the inference strategy
    ``inference`` (``kind`` and its settings) on ``pset``; returns the trained objective and the result.
    ``poses``: refine the poses with the model (the keyword arguments of ``PoseCorrections``; the objective's
    ``poses`` then holds the corrections). ``march``: share of the epochs spent widening the fitted circle
    (frequency marching, ``freq_march.py``). ``beta_warmup``: epochs over which β rises from 1/zdim
    (``MarchingObjective.epoch_beta``). ``anchor_particles``: the most particles the anchored decoder's base is
    reconstructed from (0: all; ``homogeneous_base``). ``filter_maps``: gives the fixed filters of a pose-aware
    encoder (``inference`` ``filters_from``), real-space maps of the particles' physical box; called only when
    not resuming from a checkpoint, which keeps them.

    Writes ``out_dir/checkpoint.safetensors`` after every epoch (rank 0), keeping the one before as
    ``checkpoint.prev.safetensors``; ``resume`` continues from the newest usable of the two.
    """
    hooks = Hooks.of(ctx)
    ddp, device = setup_distributed(torch.device(device))
    try:
        if inference["kind"] not in INFERENCES:
            raise ValueError(f"unknown inference {inference['kind']!r}; known: {', '.join(INFERENCES)}")
        reader = pset.reader()
        lattice = Lattice(pset.box, pset.apix).cropped(cfg.box)
        points = lattice.half_plane(cfg.max_freq * cfg.box)
        encoder = inference["kind"] == "amortised"
        n_filters = int(inference.get("encoder_filters", 0)) if encoder else 0
        bank = filter_shape(cfg.box, points.kxy, float(inference["filter_freq"])) if n_filters else (0, 0)
        n_learnt = int(inference.get("learnt_filters", 0)) if encoder else 0
        learnt = filter_shape(cfg.box, points.kxy, float(inference["learnt_filter_freq"])) if n_learnt else (0, 0)
        shape = VaeShape(len(points), 6 * cfg.pe_dim, cfg.dec_dim, cfg.dec_layers, cfg.zdim,
                         int(inference.get("enc_dim", 0)) if encoder else 0, int(inference.get("enc_layers", 0)),
                         cfg.domain == "hartley", 0 if encoder else len(reader), n_filters, *bank,
                         fixed_filters=bool(inference.get("filters_from")), learnt_filters=n_learnt,
                         learnt_voxels=learnt[0], learnt_points=learnt[1])
        host = 2 * min(opts.chunk_images, len(reader)) * pset.box ** 2 * 4  # the loader: a chunk and the next
        need = check_vae_fits(shape, opts.batch_size, len(reader), device, pset.source, host_bytes=host)
        hooks.log.info("memory plan: %.3f GB on %s", need / 1e9, device)
        corrections = None if poses is None else PoseCorrections(len(reader), lattice.apix, **poses)
        if corrections is not None:
            inference = {**inference, "poses": corrections.settings}
        ckpt = _resume_point(Path(out_dir), cfg, inference, opts, len(reader), hooks, ddp.main) if resume else None
        prep = ImagePreparer(pset, lattice, points, window_radius)
        if ckpt is None:
            cfg.data_scale = transform_rms(reader, prep, norm_sample, opts.seed)
            hooks.log.info("data scale (RMS of the transforms in the resolution circle): %.6g", cfg.data_scale)
        prep.scale = cfg.data_scale
        objective = INFERENCES[inference["kind"]](cfg, points, inference, beta, poses=corrections, march=march,
                                                   beta_warmup=beta_warmup)
        if init_model is not None and ckpt is None:
            _load_initial(objective, cfg, Path(init_model), hooks)
        elif cfg.anchor and ckpt is None:  # resuming or starting from a model restores its base map
            objective.decoder.set_base(homogeneous_base(pset, cfg.box, opts, device, hooks, anchor_particles))
        if filter_maps is not None and ckpt is None:  # a checkpoint keeps them; an initial model's may differ
            objective.filters.set_maps(filter_maps())
        hooks.log.info("volume: box %d px at %.4g Å/px, %d frequencies in the half-plane, zdim %d, beta %s",
                       cfg.box, cfg.apix, len(points), cfg.zdim, beta or f"1/zdim = {1 / max(cfg.zdim, 1):.4g}")
        if n_filters:
            hooks.log.info("encoder: %d pose-aware filter maps to %.3g Å (%d Fourier voxels each), read at %d pixels",
                           n_filters, cfg.apix / float(inference["filter_freq"]), *bank)
        if n_learnt:
            hooks.log.info("encoder: %d learnt filter maps beside them to %.3g Å (%d Fourier voxels each), read at "
                           "%d pixels, starting at zero", n_learnt, cfg.apix / float(inference["learnt_filter_freq"]),
                           *learnt)
        meta = {"config": cfg.to_json(), "inference": json.dumps(objective.settings, sort_keys=True)}
        host_need = need if torch.device(device).type == "cpu" else host  # the cache must leave the plan room
        result = Trainer(objective, reader, prep, opts, Path(out_dir), device, ddp, hooks, meta,
                         host_need).fit(ckpt)
        ddp.barrier()  # every rank's collectives are complete before the group is torn down
        return objective, result
    finally:
        ddp.close()


def homogeneous_base(pset: Any, box: int, opts: TrainOptions, device: torch.device, hooks: Hooks,
                     max_particles: int = 0) -> torch.Tensor:
    """The anchor of a volume: the homogeneous reconstruction of ``pset`` at ``box`` (plain division, FSC-weighted
    per shell, ``reconstruct.homogeneous.fsc_weighted_reconstruction``; random half-sets from ``opts.seed``), from
    at most ``max_particles`` particles drawn at random (0: all), so that the base of a large set costs a bounded
    read before the first epoch."""
    half = particle_halves(pset, opts.seed)
    n = len(half)
    if 0 < max_particles < n:
        rng, keep = np.random.default_rng(opts.seed), np.zeros(n, bool)
        for h in (1, 2):  # half of the draw from each half-set
            idx = np.flatnonzero(half == h)
            keep[rng.choice(idx, min(len(idx), max(1, max_particles // 2)), replace=False)] = True
        half = np.where(keep, half, 0)  # half-set 0: not reconstructed
    rec = fsc_weighted_reconstruction(pset, half, max(opts.batch_size, 64), device, box=box)
    hooks.log.info("anchor: homogeneous reconstruction of %d of %d particles at box %d, half-map FSC 0.143 at "
                   "%.3g Å", int((half > 0).sum()), n, box, rec.resolution(masked=False))
    return rec.full


def _resume_point(out_dir: Path, cfg: VolumeConfig, inference: dict[str, Any], opts: TrainOptions, n: int,
                  hooks: Hooks, owner: bool) -> Checkpoint | None:
    """``trainer.resume_point`` with the volume's and the inference's own checks (``owner``: the rank that writes
    the checkpoints); the data scale and the seed then continue as the run began."""
    def check(path: Path, ckpt: Checkpoint) -> None:
        check_compatible(cfg, VolumeConfig.from_dict(json.loads(ckpt.meta.get("config", "{}"))), path)
        _check_settings(inference, stored_inference(ckpt.meta), path, "checkpoint")

    ckpt = resume_point(out_dir, {}, n, hooks, owner, check)
    if ckpt is None:
        return None
    saved = VolumeConfig.from_dict(json.loads(ckpt.meta.get("config", "{}")))
    cfg.data_scale, cfg.seed = saved.data_scale, saved.seed
    seed = int(ckpt.options.get("seed", opts.seed))
    if seed != opts.seed:  # the epoch orders and noise draws continue as the run began
        hooks.log.warning("--seed %d ignored on resuming: the run was started with seed %d", opts.seed, seed)
        opts.seed = seed
    return ckpt


def _load_initial(objective: nn.Module, cfg: VolumeConfig, path: Path, hooks: Hooks) -> None:
    """Initial weights from a trained model: all of them when its inference is the same, else the volume's."""
    saved_cfg, saved_inf, tensors, _ = read_model(path)
    check_compatible(cfg, saved_cfg, path)
    state = objective.state_dict()
    own = [k for k in state if not k.startswith("poses.")]  # pose corrections belong to the particles of a run
    same = saved_inf.get("kind") == objective.kind and all(
        k in tensors and tensors[k].shape == state[k].shape for k in own)
    keep = own if same else [k for k in state if k.startswith("decoder.")]
    objective.load_state_dict({**state, **{k: tensors[k] for k in keep}})
    hooks.log.info("initial weights from %s (%s)", path, "all" if same else "the volume's only")
