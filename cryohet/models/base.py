"""What every model of V(τ, r) offers to analysis and validation: the map at a latent point.

A method that fits a heterogeneity model registers a ``model`` output in its run record with
``meta={"model_type": <name>}``; ``load_volume_model(run_dir)`` returns the matching
``VolumeModel`` so that analysis (volumes at points, along paths) and scoring work for any method.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from cryohet.errors import InputError
from cryohet.record import read_record

#: model_type -> "module:function(run_dir, model_path) -> VolumeModel"
MODEL_LOADERS: dict[str, str] = {
    "linear": "cryohet.models.linear:load_run_model",
    "vae": "cryohet.models.neural:load_run_model",
    "maps": "cryohet.validation.sources:load_run_model",
}


class VolumeModel(Protocol):
    latent_dim: int
    box: int
    apix: float

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps at latent points ``z`` (M, latent_dim) -> float32 (M, box, box, box), RELION orientation."""
        ...


def load_volume_model(run_dir: str | Path) -> VolumeModel:
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    out = record.require("model", run_dir, "model of the volumes")
    model_type = out.meta.get("model_type")
    if model_type not in MODEL_LOADERS:
        raise InputError(run_dir / out.path, f"unknown model type {model_type!r}")
    mod, func = MODEL_LOADERS[model_type].split(":")
    return getattr(importlib.import_module(mod), func)(run_dir, run_dir / out.path)
