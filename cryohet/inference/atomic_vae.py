"""Training an atomic decoder on the images (CryoSTAR's first stage): the ELBO plus structural restraints.

The encoder of ``amortised.AmortisedInference`` gives q(z | image); the decoder is any
``models.atomic_decoder.MLPDisplacedAtoms`` (residues, or the Gaussians of a consensus map in
``models.gaussian_mixture``, displaced by an MLP of z and rendered as Gaussians). The loss per batch is

    data + λ_en · elastic + λ_clash · clash + kl_weight · KL

with the restraints of ``atomic_restraints`` evaluated on the residues decoded at each image's sampled z. The
restraint weights are calibrated once, before training, by DynaMight's rule: λ = factor × ‖∇data‖ / ‖∇elastic‖,
the gradients taken with respect to the residue positions of the reference displaced at random by
``CALIBRATION_RMS_A`` on a fixed sample of images; ``--elastic_weight`` and ``--clash_weight`` are the factors
(so their meaning does not depend on the number of residues, the SNR or the data scale), and the absolute
weights are kept in the model and its checkpoints. Training runs through the shared ``Trainer`` (streaming
epochs, a checkpoint per epoch, resume); the data term and each restraint are recorded per epoch in
``restraint_history.json`` (the trainer's ``on_epoch_end`` hook; the objective's ``epoch_terms`` add them to the
trainer's history).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.data.prepare import ImagePreparer, prepared_sample
from cryohet.distributed import Dist
from cryohet.errors import InputError
from cryohet.inference.amortised import AmortisedInference
from cryohet.inference.atomic_restraints import Restraints
from cryohet.inference.elbo import gaussian_elbo
from cryohet.inference.pose_tables import PoseCorrections, posed
from cryohet.inference.trainer import Hooks, Trainer, TrainOptions, TrainResult, resume_point
from cryohet.io.reader import ImageReader
from cryohet.models.atomic_decoder import MLPDisplacedAtoms

#: RMS (Å) of the random displacements of the reference at which the restraint weights are calibrated.
CALIBRATION_RMS_A = 1.0
HISTORY_NAME = "restraint_history.json"
TERMS = ("data", "elastic", "clash")


class RestrainedAmortised(AmortisedInference):
    """Encoder + atomic decoder trained on the ELBO plus the restraints; ``weights`` (λ_en, λ_clash) absolute.

    Subclasses with other penalties set ``TERMS`` (``"data"`` then one name per penalty, ``weights`` in that
    order) and override ``penalties``.

    With ``warmup_steps`` the KL term and the penalties are ramped linearly from 0 over the first training steps
    (counted in a buffer, so a resumed run and every rank continue the same ramp): the encoder first makes z
    informative, before the prior and the restraints pull on it (without it, the pseudo-atoms of a map at low SNR
    fall into posterior collapse)."""

    kind = "amortised-atomic"
    TERMS: tuple[str, ...] = TERMS

    def __init__(self, decoder: Any, restraints: Any, weights: tuple[float, ...], points: Any,
                 settings: dict[str, Any], beta: float, warmup_steps: int = 0, poses: PoseCorrections | None = None):
        super().__init__(None, points, settings, beta, decoder=decoder, poses=poses)
        self.restraints = restraints
        self.register_buffer("restraint_weight", torch.tensor(weights, dtype=torch.float32))
        self.warmup_steps = int(warmup_steps)
        if self.warmup_steps:
            self.register_buffer("step", torch.zeros((), dtype=torch.float64))
        self.tally = torch.zeros(len(self.TERMS) + 1, dtype=torch.float64)  # sums per image of each term, images

    def penalties(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The penalties (elastic, clash) of the models decoded at latents ``z``."""
        return tuple(self.restraints(self.decoder.positions(z)))

    @property
    def ramp(self) -> float:
        """The warm-up's factor of the KL and penalty weights now (1 without warm-up)."""
        return min(1.0, float(self.step) / self.warmup_steps) if self.warmup_steps else 1.0

    @property
    def kl_weight(self) -> float:
        return self._kl_full * self.ramp

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._kl_full = float(value)

    def forward(self, d: dict[str, torch.Tensor], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.warmup_steps:
            self.step += 1
        mu, logvar = self.encoder(d["enc"])
        data, kld = gaussian_elbo(self.decoder, self.kxy, *posed(self.poses, d, self.kxy), d["ctf"], mu, logvar, eps)
        z = mu.float() + eps * torch.exp(0.5 * logvar.float())  # the z gaussian_elbo decoded
        terms = self.penalties(z)
        if self.training:
            vals = torch.stack([data.detach(), *(t.detach() for t in terms)]).double().cpu()
            self.tally += torch.cat([vals * len(z), torch.tensor([float(len(z))], dtype=torch.float64)])
        ramp = self.ramp
        return data + sum(ramp * w * t for w, t in zip(self.restraint_weight, terms, strict=True)), kld

    def epoch_terms(self) -> dict[str, float]:
        """The mean of each term over the images since the last call (data: MSE; restraints: Å²), for the
        trainer's history of the epoch."""
        t, self.tally = self.tally, torch.zeros_like(self.tally)
        n = max(float(t[-1]), 1.0)
        return {name: float(t[i]) / n for i, name in enumerate(self.TERMS)}


def gradient_norms(decoder: Any, reader: ImageReader, prep: ImagePreparer, device: torch.device,
                   perturb: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_sample: int = 256,
                   seed: int = 0) -> tuple[float, float, float]:
    """DynaMight's calibration: (Σ ‖∇data‖, Σ ‖∇penalty‖, the mean data term) over a fixed sample of prepared
    images, both gradients with respect to the variable ``v`` of ``perturb(n) -> (v, positions, penalty)`` (``v`` a
    leaf requiring grad, ``positions`` (n, N, 3) Å the decoder's atoms as a function of it, ``penalty`` a scalar
    function of it)."""
    kxy = prep.points.kxy.to(device)
    decoder.to(device)
    num = den = total = 0.0
    batches = 0
    for b in prepared_sample(reader, prep, n_sample, seed, 0xCA1):
        y = torch.view_as_real(b.images_ft).to(device)
        v, pos, penalty = perturb(len(b.rows))
        pred = decoder.slices_at(b.rotations.to(device), pos, kxy) * b.ctf.to(device)[..., None]
        data = ((pred - y) ** 2).sum(-1).mean()
        num += float(torch.autograd.grad(data, v, retain_graph=True)[0].norm())
        den += float(torch.autograd.grad(penalty, v)[0].norm())
        total, batches = total + float(data.detach()), batches + 1
    return num, den, total / max(batches, 1)


def calibrate_weights(decoder: MLPDisplacedAtoms, restraints: Restraints, reader: ImageReader, prep: ImagePreparer,
                      device: torch.device, n_sample: int = 256, seed: int = 0) -> float:
    """‖∇data‖ / ‖∇elastic‖ with respect to the residue positions (DynaMight's calibration), at the reference
    displaced at random by ``CALIBRATION_RMS_A`` Å RMS, summed over a fixed sample of prepared images."""
    g = torch.Generator().manual_seed(seed)

    def perturb(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn((n, *decoder.rel0_A.shape), generator=g) * CALIBRATION_RMS_A / np.sqrt(3)
        pos = (decoder.rel0_A + noise.to(device)).requires_grad_(True)
        return pos, pos, restraints.elastic(pos)

    num, den, _ = gradient_norms(decoder, reader, prep, device, perturb, n_sample, seed)
    if not (num > 0 and den > 0):
        raise ValueError("the restraint weights cannot be calibrated: the data or the elastic network has no "
                         "gradient (no springs within the cutoff?)")
    return num / den


def fit_atomic(decoder: MLPDisplacedAtoms, restraints: Restraints, factors: tuple[float, float], reader: ImageReader,
               prep: ImagePreparer, opts: TrainOptions, enc_layers: int, enc_dim: int, beta: float,
               out_dir: str | Path, device: torch.device, hooks: Hooks, resume: bool = False,
               warmup_epochs: float = 0.0, encoder: dict[str, torch.Tensor] | None = None,
               poses: dict[str, Any] | None = None) -> tuple[RestrainedAmortised, TrainResult, list[dict[str, float]]]:
    """Train an encoder and ``decoder`` (its intensity scale estimated) on the images prepared by ``prep``, with
    the restraints weighted by ``factors`` (elastic, clash) × the calibration, they and the KL term ramped up over
    the first ``warmup_epochs``; the encoder starts from the state ``encoder`` when given (another model's);
    ``poses``: refine the poses with the model (``pose_corrections``).
    Returns the objective, the trainer's result (``z_mu`` rows in particle-file order) and the per-epoch terms."""
    out_dir = Path(out_dir)
    settings = {"enc_layers": enc_layers, "enc_dim": enc_dim, "seed": opts.seed}
    restraint_cfg = {"cutoff_A": restraints.cutoff_A, "bond_weight": restraints.bond_weight,
                     "min_distance_A": restraints.min_distance_A, "factors": list(factors)}
    meta = {"inference": json.dumps(settings, sort_keys=True), "beta": repr(beta),
            "decoder": json.dumps(decoder.architecture(), sort_keys=True),
            "restraints": json.dumps(restraint_cfg, sort_keys=True), "points": str(len(prep.points))}
    if warmup_epochs:
        meta["warmup_epochs"] = repr(float(warmup_epochs))
    if encoder is not None:
        meta["encoder_start"] = "given"
    corrections = pose_corrections(poses, len(reader), prep, meta)
    ckpt = resume_point(out_dir, meta, len(reader), hooks, check=pose_check(meta)) if resume else None
    calib = 1.0
    if ckpt is None:
        calib = calibrate_weights(decoder, restraints, reader, prep, device, seed=opts.seed)
        hooks.log.info("restraint calibration: |grad data| / |grad elastic| = %.4g at %.3g Å RMS", calib,
                       CALIBRATION_RMS_A)
    weights = (factors[0] * calib, factors[1] * calib)
    steps = int(round(warmup_epochs * math.ceil(len(reader) / opts.batch_size)))
    objective = RestrainedAmortised(decoder, restraints, weights, prep.points, settings, beta, steps, corrections)
    if encoder is not None and ckpt is None:
        objective.encoder.load_state_dict(encoder)
    result, terms = train_restrained(objective, reader, prep, opts, out_dir, device, hooks, meta, ckpt)
    hooks.log.info("restraint weights: elastic %.4g, clash %.4g", *objective.restraint_weight.tolist())
    return objective, result, terms


def pose_corrections(poses: dict[str, Any] | None, n: int, prep: ImagePreparer, meta: dict[str, str]
                     ) -> PoseCorrections | None:
    """The pose corrections of ``n`` particles on ``prep``'s lattice (None without ``poses``); their settings go
    into the checkpoints' ``meta`` (``pose_check``: a resumed run must agree on them, or on having none)."""
    if poses is None:
        return None
    corrections = PoseCorrections(n, prep.lattice.apix, **poses)
    meta["poses"] = json.dumps(corrections.settings, sort_keys=True)
    return corrections


def pose_check(meta: dict[str, str]) -> Callable[[Path, Any], None]:
    """``resume_point``'s check that a checkpoint was trained with the pose refinement of ``meta`` (or none)."""
    def check(path: Path, ckpt: Any) -> None:
        if ckpt.meta.get("poses") != meta.get("poses"):
            raise InputError(path, f"the checkpoint was trained with pose refinement {ckpt.meta.get('poses')} "
                                   f"but {meta.get('poses')} is asked (--refine_poses and its settings must agree)")
    return check


def train_restrained(objective: RestrainedAmortised, reader: ImageReader, prep: ImagePreparer, opts: TrainOptions,
                     out_dir: Path, device: torch.device, hooks: Hooks, meta: dict[str, str], ckpt: Any
                     ) -> tuple[TrainResult, list[dict[str, float]]]:
    """Train ``objective`` with the shared trainer from ``ckpt`` (None: from the start), writing its terms per
    epoch to ``HISTORY_NAME``; returns the trainer's result and the per-epoch terms."""
    def write_terms(epoch: int, history: list[dict[str, float]]) -> None:
        with atomic_path(out_dir / HISTORY_NAME) as tmp:
            tmp.write_text(json.dumps(restraint_terms(history, objective.TERMS), indent=1))

    trainer = Trainer(objective, reader, prep, opts, out_dir, device, Dist(),
                      dataclasses.replace(hooks, on_epoch_end=write_terms), meta)
    result = trainer.fit(ckpt)  # a checkpoint's state holds the absolute weights it was trained with
    return result, restraint_terms(result.history, objective.TERMS)


def restraint_terms(history: list[dict[str, float]], names: tuple[str, ...] = TERMS) -> list[dict[str, float]]:
    """The epoch and each term ``names`` of every epoch of the trainer's ``history``."""
    return [{"epoch": h["epoch"], **{k: h[k] for k in names}} for h in history]
