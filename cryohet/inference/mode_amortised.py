"""Amortised normal-mode amplitudes (DeepHEMNMA class): an encoder of each image predicts its amplitudes.

The encoder of ``amortised.AmortisedInference`` is trained with the normal-mode model as its decoder (atoms fixed;
the intensity scale trained with it) on the ELBO, through the shared ``Trainer`` (streaming epochs, a checkpoint
after every epoch, resume). The prior N(0, I) is on amplitudes in Å RMS; its weight ``beta`` is small by default
so that the fit is close to a deterministic regression of the amplitudes. Once trained, the encoder gives every
particle's amplitudes in one pass, whatever their number.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cryohet.data.prepare import ImagePreparer
from cryohet.distributed import Dist
from cryohet.inference.amortised import AmortisedInference
from cryohet.inference.trainer import Hooks, Trainer, TrainOptions, TrainResult, resume_point
from cryohet.io.reader import ImageReader
from cryohet.models.modes import ModeModel


def fit_amortised(model: ModeModel, reader: ImageReader, prep: ImagePreparer, opts: TrainOptions, enc_layers: int,
                  enc_dim: int, beta: float, out_dir: str | Path, device: torch.device, hooks: Hooks,
                  resume: bool = False) -> tuple[AmortisedInference, TrainResult]:
    """Train an encoder of the images prepared by ``prep`` to the amplitudes of ``model`` (its scale already
    estimated); returns the trained objective (``.decoder`` is ``model``) and the trainer's result, whose
    ``z_mu`` (N, K) are the amplitudes in Å RMS, rows in particle-file order."""
    settings = {"enc_layers": enc_layers, "enc_dim": enc_dim, "seed": opts.seed}
    objective = AmortisedInference(None, prep.points, settings, beta, decoder=model)
    meta = {"inference": json.dumps(objective.settings, sort_keys=True), "beta": repr(beta),
            "decoder": json.dumps({k: v for k, v in model.describe().items() if k != "scale"}, sort_keys=True),
            "points": str(len(prep.points))}
    ckpt = resume_point(Path(out_dir), meta, len(reader), hooks) if resume else None
    result = Trainer(objective, reader, prep, opts, Path(out_dir), device, Dist(), hooks, meta).fit(ckpt)
    return objective, result
