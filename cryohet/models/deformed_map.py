"""A canonical map deformed per latent point (Zernike3D of flexutils, neural flow fields of the 3DFlex class).

    x_i(z) = x_i + d(z, x_i)        (Å; the canonical points x_i on a grid in the consensus' mask)

The canonical map is ``models.canonical_map``'s: Gaussians on a regular grid inside the mask with amplitudes
fitted to the consensus (learned with the deformation: ``DisplacedAtoms(learn_weights=True)``); ``d`` is a field
of ``models.deformation_fields`` (``ZernikeField`` or ``FlowField``), zero at the start. A
``DeformationModel``: ``displacement_field(z, x_A)`` moves any canonical point, ``displacements(z)`` is it at
the canonical points. Rendering, slices, volumes and the file are ``DisplacedAtoms``'.

File: ``model.safetensors`` (the field's tensors, the points' ``coords_A`` and current ``amplitude``, the fitted
``amplitude0``; box, pixel size, resolution, grid and the field's architecture in its metadata).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.geometry.gaussians import gaussian_map
from cryohet.io.atomic_model import Atoms, box_centre_A
from cryohet.models.deformation_fields import FlowField, ZernikeField, make_field
from cryohet.models.displaced_atoms import DisplacedAtoms

MODEL_TYPE = "deformed_map"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-deformed-map-1"


class DeformedMap(DisplacedAtoms):
    """Canonical points ``atoms`` (map frame, Å, amplitudes as weights) on a grid of ``grid_A`` moved by
    ``field``."""

    MODEL_FORMAT, WHAT, WEIGHT_KEY = MODEL_FORMAT, "deformed-map", "amplitude"

    def __init__(self, atoms: Atoms, box: int, apix: float, resolution_A: float, grid_A: float,
                 field: ZernikeField | FlowField, scale: float = 1.0, data_scale: float = 1.0):
        super().__init__(atoms, box, apix, resolution_A, scale, data_scale, learn_weights=True)
        self.grid_A = float(grid_A)
        self.field = field
        self.register_buffer("amplitude0", self.weight.detach().clone())  # the fit to the consensus

    @property
    def latent_dim(self) -> int:
        return self.field.zdim

    def displacement_field(self, z: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) Å at latents ``z`` (B, zdim) of canonical points ``x_A`` (P, 3) Å from the box
        centre (the ``DeformationModel`` contract)."""
        return self.field(z, x_A)

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) Å of the canonical points at latents ``z`` (B, zdim)."""
        return self.field(z, self.rel0_A)

    def canonical_map(self) -> np.ndarray:
        """The (refined) canonical map (box, box, box) float32, on the particles' scale."""
        scale = float(self.log_scale.detach().exp()) * self.data_scale
        return (scale * gaussian_map(self.atoms.xyz_A, self.weight.detach().cpu().double().numpy(), self.box,
                                     self.apix, self.resolution_A, box_centre_A(self.box, self.apix))
                ).astype(np.float32)

    def architecture(self) -> dict[str, Any]:
        return {"n_points": len(self.atoms), "box": self.box, "apix": self.apix, "resolution_A": self.resolution_A,
                "grid_A": self.grid_A, "field": self.field.architecture()}

    def describe(self) -> dict[str, Any]:
        w, w0 = self.weight.detach(), self.amplitude0
        return {**self.architecture(), "scale": float(self.log_scale.detach().exp()),
                "amplitude_drift": float((w - w0).norm() / w0.norm())}

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {"amplitude0": self.amplitude0.cpu(), "log_scale": self.log_scale.detach().cpu(),
                **{f"field.{k}": v.detach().cpu() for k, v in self.field.state_dict().items()}}

    def _file_meta(self) -> dict[str, str]:
        return {"architecture": json.dumps(self.architecture())}

    @classmethod
    def _from_file(cls, atoms: Atoms, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> DeformedMap:
        arch = json.loads(meta["architecture"])
        model = cls(atoms, arch["box"], arch["apix"], arch["resolution_A"], arch["grid_A"], make_field(arch["field"]),
                    data_scale=float(meta.get("data_scale", 1.0)))
        model.field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("field.")})
        with torch.no_grad():
            model.amplitude0.copy_(tensors["amplitude0"])
            model.log_scale.copy_(tensors["log_scale"])
        return model


def load_run_model(run_dir: str | Path, model_path: str | Path) -> DeformedMap:
    """The ``VolumeModel`` of a train-deform run."""
    return DeformedMap.load(model_path)
