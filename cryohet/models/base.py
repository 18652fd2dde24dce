"""The model contract: what every model of V(τ, r) offers.

* ``VolumeModel`` (analysis, validation, hosts): the map at a latent point.
* ``SliceModel`` (inference): central slices at given rotations and latents, on any pixels of the image lattice
  (``geometry.lattice.Points.kxy``); an inference strategy (``cryohet.inference``) fits it to prepared images.
* ``DeformationModel`` (deformation-corrected reconstruction, displacement fields): a model whose conformations are
  one canonical map deformed; it gives the displacement of any canonical point at a latent point.

A method that fits a heterogeneity model registers a ``model`` output in its run record with
``meta={"model_type": <name>}``; ``load_volume_model(run_dir)`` returns the matching
``VolumeModel`` so that analysis (volumes at points, along paths) and scoring work for any method.
Model types are discovered: each module ``cryohet/models/<name>.py`` that declares ``MODEL_TYPE = "<type>"``
provides ``load_run_model(run_dir, model_path) -> VolumeModel`` for it; nothing is listed by hand.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.record import read_record


class VolumeModel(Protocol):
    latent_dim: int
    box: int
    apix: float

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps at latent points ``z`` (M, latent_dim) -> float32 (M, box, box, box), RELION orientation."""
        ...


class SliceModel(VolumeModel, Protocol):
    """A volume model that gradient-trained inference can fit (an ``nn.Module``)."""

    def slices(self, rot: torch.Tensor, z: torch.Tensor | None, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices without CTF for RELION rotation matrices ``rot`` (B, 3, 3) and latents ``z`` (B, latent_dim)
        at image frequencies ``kxy`` (M, 2) cycles/pixel -> (B, M, 2) real and imaginary parts."""
        ...


class DeformationModel(VolumeModel, Protocol):
    """A volume model that deforms one canonical map (Gaussian mixtures, Zernike3D, flow fields)."""

    def displacement_field(self, z: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) Å (x, y, z) at latents ``z`` (B, latent_dim) of canonical points ``x_A`` (P, 3) Å
        (x, y, z) relative to the box centre: the point x of the canonical map lies at x + d(z, x) in the
        conformation z."""
        ...


def _discover() -> tuple[dict[str, ModuleType], list[Exception]]:
    """(model_type -> module, exceptions of the modules that failed to import)."""
    found: dict[str, ModuleType] = {}
    errors: list[Exception] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.ispkg or info.name == "base" or info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as exc:  # kept: raised only when its model type is asked for
            errors.append(exc)
            continue
        model_type = getattr(mod, "MODEL_TYPE", None)
        if model_type is None:
            continue
        if model_type in found:
            raise RuntimeError(f"model type {model_type!r} is declared by both {found[model_type].__name__} "
                               f"and {mod.__name__}")
        if not callable(getattr(mod, "load_run_model", None)):
            raise RuntimeError(f"{mod.__name__} declares MODEL_TYPE {model_type!r} but has no load_run_model")
        found[model_type] = mod
    return found, errors


def model_modules() -> dict[str, ModuleType]:
    """model_type -> the module under cryohet.models that declares it (``MODEL_TYPE``) and loads it
    (``load_run_model(run_dir, model_path)``). Imports every module of the package but ``base`` and ``_*``;
    one that fails to import is left out, so that it does not hide the other model types."""
    return _discover()[0]


def load_volume_model(run_dir: str | Path) -> VolumeModel:
    """The VolumeModel of a run folder, by the ``model_type`` of its ``model`` output."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    out = record.require("model", run_dir, "model of the volumes")
    model_type = out.meta.get("model_type")
    modules, errors = _discover()
    if model_type not in modules:
        if errors:  # the module of this type may be one that does not import: show why
            raise errors[0]
        raise InputError(run_dir / out.path, f"unknown model type {model_type!r} (known: {', '.join(sorted(modules))})")
    return modules[model_type].load_run_model(run_dir, run_dir / out.path)
