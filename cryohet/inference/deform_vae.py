"""Training a deformed canonical map on the images: the ELBO plus a rigidity term and an amplitude-drift term.

The encoder of ``amortised.AmortisedInference`` gives q(z | image); the decoder is ``models.deformed_map``'s (the
canonical points moved by a Zernike3D or flow field, their amplitudes learned too). The loss per batch is

    data + λ_rigid · rigidity + λ_amp · drift + kl_weight · KL

* rigidity (3DFlex's regulariser, as-rigid-as-possible): the mean over images and over ``REG_POINTS`` canonical
  points drawn per batch (from the batch's latent noise, so that a resumed run retraces) of ‖JᵀJ − I‖²_F,
  J = I + ∇d the local Jacobian of the deformation, ∇d by central differences of step ``grid_A`` (the points'
  spacing): zero for any rotation and translation of the neighbourhood, so domains may move rigidly while the
  field is kept from stretching, shearing or folding.
* drift: ‖w − w0‖² / ‖w0‖² of the canonical amplitudes w against their fit to the consensus w0, so the
  canonical map is refined without wandering off to absorb the motion.

The weights are calibrated once, before training, by DynaMight's rule (``atomic_vae.gradient_norms``):
λ_rigid = factor × ‖∇data‖ / ‖∇rigidity‖, both gradients with respect to the coefficients of a random Zernike3D
deformation (L1 = 3, L2 = 2 on the same ball) of ``CALIBRATION_RMS_A`` Å RMS at the points, on a fixed sample of
images, for either field; λ_amp = factor × the data term of that sample (so a drift of 100 % RMS costs ``factor``
times the starting data term). The absolute weights are kept in the model's checkpoints.
Training is ``atomic_vae.train_restrained``'s: the shared ``Trainer``, a checkpoint per epoch, resume, the terms
of each epoch in ``restraint_history.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.zernike3d import basis_degrees, zernike3d_basis
from cryohet.inference.atomic_vae import (
    RestrainedAmortised,
    gradient_norms,
    pose_check,
    pose_corrections,
    train_restrained,
)
from cryohet.inference.pose_tables import PoseCorrections
from cryohet.inference.trainer import Hooks, TrainOptions, TrainResult, resume_point
from cryohet.io.reader import ImageReader
from cryohet.models.deformed_map import DeformedMap

#: RMS (Å) of the random Zernike3D deformation at which the rigidity weight is calibrated
CALIBRATION_RMS_A = 1.0
#: canonical points at which the rigidity is evaluated per batch
REG_POINTS = 128


def field_jacobian(field: Any, z: torch.Tensor | None, x_A: torch.Tensor, step_A: float) -> torch.Tensor:
    """∇d (B, P, 3, 3) (∂d_i/∂x_j) of the displacement field ``field(z, x)`` -> (B, P, 3) at points ``x_A``
    (P, 3) Å, by central differences of ``step_A``."""
    eye = torch.eye(3, dtype=x_A.dtype, device=x_A.device) * step_A
    moved = torch.cat([x_A + eye[j] for j in range(3)] + [x_A - eye[j] for j in range(3)])
    d = field(z, moved).reshape(-1, 6, len(x_A), 3)                       # (B, ±j, P, i)
    return ((d[:, :3] - d[:, 3:]) / (2 * step_A)).permute(0, 2, 3, 1)


def rigidity(grad_d: torch.Tensor) -> torch.Tensor:
    """Mean of ‖JᵀJ − I‖²_F over images and points, J = I + ∇d (``grad_d`` (B, P, 3, 3))."""
    eye = torch.eye(3, dtype=grad_d.dtype, device=grad_d.device)
    j = eye + grad_d
    return ((j.transpose(-1, -2) @ j - eye) ** 2).sum((-1, -2)).mean()


def reg_points(n: int, seed: int) -> torch.Tensor:
    """Indices of ``REG_POINTS`` of ``n`` canonical points (all when fewer) drawn from ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:REG_POINTS]


class DeformAmortised(RestrainedAmortised):
    """Encoder + deformed canonical map trained on the ELBO plus rigidity and amplitude drift; ``weights``
    (λ_rigid, λ_amp) absolute."""

    kind = "amortised-deform"
    TERMS = ("data", "rigidity", "drift")

    def __init__(self, decoder: DeformedMap, weights: tuple[float, float], points: Any, settings: dict[str, Any],
                 beta: float, poses: PoseCorrections | None = None):
        super().__init__(decoder, None, weights, points, settings, beta, poses=poses)

    def forward(self, d: dict[str, torch.Tensor], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the trainer draws eps from (seed, epoch, step): the points of the rigidity term follow it
        self._reg_seed = int(eps.detach().double().abs().sum().mul(1e6).item()) % (2 ** 31)
        return super().forward(d, eps)

    def penalties(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dec = self.decoder
        x = dec.rel0_A[reg_points(len(dec.atoms), self._reg_seed).to(z.device)]
        rigid = rigidity(field_jacobian(dec.displacement_field, z.float(), x, dec.grid_A))
        drift = ((dec.weight - dec.amplitude0) ** 2).sum() / (dec.amplitude0 ** 2).sum()
        return rigid, drift


def calibrate_deform(decoder: DeformedMap, reader: ImageReader, prep: ImagePreparer, device: torch.device,
                     n_sample: int = 256, seed: int = 0) -> tuple[float, float]:
    """(‖∇data‖ / ‖∇rigidity‖ for a random Zernike3D deformation of ``CALIBRATION_RMS_A`` Å RMS, the mean data
    term there) on a fixed sample of prepared images (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    decoder.to(device)
    radius = float(decoder.rel0_A.norm(dim=1).max()) + decoder.grid_A
    degrees = basis_degrees(3, 2)
    basis = zernike3d_basis(decoder.rel0_A / radius, degrees)                          # (P, K)
    x_reg = decoder.rel0_A[reg_points(len(decoder.atoms), seed).to(device)]

    def perturb(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.randn((n, 3, len(degrees)), generator=g).to(device)
        d = torch.einsum("pk,bck->bpc", basis, c)
        c = (c * CALIBRATION_RMS_A / d.pow(2).sum(-1).mean((1,), keepdim=True).sqrt()[..., None]).requires_grad_(True)

        def field(_: Any, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("pk,bck->bpc", zernike3d_basis(x / radius, degrees), c)

        pos = decoder.rel0_A + field(None, decoder.rel0_A)
        return c, pos, rigidity(field_jacobian(field, None, x_reg, decoder.grid_A))

    num, den, data = gradient_norms(decoder, reader, prep, device, perturb, n_sample, seed)
    if not (num > 0 and den > 0):
        raise ValueError("the rigidity weight cannot be calibrated: the data or the rigidity term has no gradient")
    return num / den, data


def fit_deform(decoder: DeformedMap, factors: tuple[float, float], reader: ImageReader, prep: ImagePreparer,
               opts: TrainOptions, enc_layers: int, enc_dim: int, beta: float, out_dir: str | Path,
               device: torch.device, hooks: Hooks, resume: bool = False, poses: dict[str, Any] | None = None
               ) -> tuple[DeformAmortised, TrainResult, list[dict[str, float]]]:
    """Train an encoder and ``decoder`` on the images prepared by ``prep`` with the rigidity and drift weighted
    by ``factors`` × their calibration (``poses``: refine the poses with the model); returns the objective, the
    trainer's result (``z_mu`` rows in particle-file order) and the per-epoch terms."""
    out_dir = Path(out_dir)
    settings = {"enc_layers": enc_layers, "enc_dim": enc_dim, "seed": opts.seed}
    meta = {"inference": json.dumps(settings, sort_keys=True), "beta": repr(beta),
            "decoder": json.dumps(decoder.architecture(), sort_keys=True),
            "regularisers": json.dumps({"factors": list(factors), "reg_points": REG_POINTS}),
            "points": str(len(prep.points))}
    corrections = pose_corrections(poses, len(reader), prep, meta)
    ckpt = resume_point(out_dir, meta, len(reader), hooks, check=pose_check(meta)) if resume else None
    calib = (1.0, 1.0)
    if ckpt is None:
        calib = calibrate_deform(decoder, reader, prep, device, seed=opts.seed)
        hooks.log.info("calibration: |grad data| / |grad rigidity| = %.4g at %.3g Å RMS; data term %.4g at the "
                       "canonical map", calib[0], CALIBRATION_RMS_A, calib[1])
    objective = DeformAmortised(decoder, (factors[0] * calib[0], factors[1] * calib[1]), prep.points, settings,
                                beta, corrections)
    result, terms = train_restrained(objective, reader, prep, opts, out_dir, device, hooks, meta, ckpt)
    hooks.log.info("regulariser weights: rigidity %.4g, amplitude drift %.4g", *objective.restraint_weight.tolist())
    return objective, result, terms
