"""Atoms displaced along normal modes: a volume model whose latent coordinates are mode amplitudes (HEMNMA).

    x(z) = x0 + Σ_k z_k · sqrt(N) · u_k

with ``u_k`` unit vectors in 3N (``modes.npz``), so that an amplitude z_k is the RMS displacement over the N atoms
in Å. Rendering, slices, volumes and the file are ``models.displaced_atoms.DisplacedAtoms``'. The
reference atoms and modes are fixed; ``log_scale`` (the intensity scale to the data as fitted: transforms divided
by ``data_scale``) is the one parameter, and maps are on the particles' own scale (times ``data_scale``).

File: ``model.safetensors`` (tensors ``coords_A``, ``modes``, ``weight``, ``log_scale``; the box, pixel size,
resolution, the mode numbers and the atoms' names in its metadata). Positions are in the map frame.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.io.atomic_model import Atoms
from cryohet.models.displaced_atoms import DisplacedAtoms

MODEL_TYPE = "normal_modes"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-normal-modes-1"


class ModeModel(DisplacedAtoms):
    """Atoms ``atoms`` (map frame) moved along ``modes`` (K, N, 3) unit vectors; ``mode_numbers`` (K,) 1-based."""

    MODEL_FORMAT, WHAT, WEIGHT_KEY = MODEL_FORMAT, "normal-modes", "weight"

    def __init__(self, atoms: Atoms, modes: np.ndarray, mode_numbers: list[int], box: int, apix: float,
                 resolution_A: float, scale: float = 1.0, data_scale: float = 1.0):
        modes = np.asarray(modes, np.float64)
        if modes.ndim != 3 or modes.shape[1:] != (len(atoms), 3) or len(modes) != len(mode_numbers):
            raise ValueError(f"modes {modes.shape} do not match {len(atoms)} atoms and {len(mode_numbers)} numbers")
        super().__init__(atoms, box, apix, resolution_A, scale, data_scale)
        self.mode_numbers = [int(m) for m in mode_numbers]
        self.register_buffer("disp_A", torch.as_tensor(modes * math.sqrt(len(atoms)), dtype=torch.float32))

    @property
    def latent_dim(self) -> int:
        return len(self.mode_numbers)

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """Displacements (B, N, 3) Å at amplitudes ``z`` (B, K) Å RMS, float32 even under mixed precision."""
        with torch.autocast(z.device.type, enabled=False):
            return torch.einsum("bk,knj->bnj", z.float(), self.disp_A)

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {"modes": (self.disp_A.double() / math.sqrt(len(self.atoms))).cpu(),
                "log_scale": self.log_scale.detach().cpu().reshape(1)}

    def _file_meta(self) -> dict[str, str]:
        return {"box": str(self.box), "apix": repr(self.apix), "resolution_A": repr(self.resolution_A),
                "mode_numbers": json.dumps(self.mode_numbers)}

    @classmethod
    def _from_file(cls, atoms: Atoms, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> ModeModel:
        return cls(atoms, tensors["modes"].numpy(), json.loads(meta["mode_numbers"]), int(meta["box"]),
                   float(meta["apix"]), float(meta["resolution_A"]), float(tensors["log_scale"].exp()),
                   float(meta.get("data_scale", 1.0)))

    def describe(self) -> dict[str, Any]:
        return {"n_atoms": len(self.atoms), "modes": self.mode_numbers, "box": self.box, "apix": self.apix,
                "resolution_A": self.resolution_A, "scale": float(self.log_scale.detach().exp())}


def load_run_model(run_dir: str | Path, model_path: str | Path) -> ModeModel:
    """The ``VolumeModel`` of a fit-modes run."""
    return ModeModel.load(model_path)
