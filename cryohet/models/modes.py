"""Atoms displaced along normal modes: a volume model whose latent coordinates are mode amplitudes (HEMNMA).

    x(z) = x0 + Σ_k z_k · sqrt(N) · u_k

with ``u_k`` unit vectors in 3N (``modes.npz``), so that an amplitude z_k is the RMS displacement over the N atoms
in Å. Each atom is an isotropic Gaussian of width ``SIGMA_PER_RESOLUTION · resolution_A`` and weight its electrons;
the map is ``scale`` times what ``geometry.gaussians.gaussian_map`` renders (``volumes``) and the central slices
are the analytic ones of ``geometry.gaussian_slices`` (``slices``), the same function below the resolution. The
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
from torch import nn

from cryohet.errors import InputError
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION, gaussian_map
from cryohet.io.atomic_model import Atoms, box_centre_A
from cryohet.io.normal_modes import ATOM_FIELDS
from cryohet.io.weights import read_weights, write_weights

MODEL_TYPE = "normal_modes"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-normal-modes-1"


class ModeModel(nn.Module):
    """Atoms ``atoms`` (map frame) moved along ``modes`` (K, N, 3) unit vectors; ``mode_numbers`` (K,) 1-based."""

    def __init__(self, atoms: Atoms, modes: np.ndarray, mode_numbers: list[int], box: int, apix: float,
                 resolution_A: float, scale: float = 1.0, data_scale: float = 1.0):
        super().__init__()
        modes = np.asarray(modes, np.float64)
        if modes.ndim != 3 or modes.shape[1:] != (len(atoms), 3) or len(modes) != len(mode_numbers):
            raise ValueError(f"modes {modes.shape} do not match {len(atoms)} atoms and {len(mode_numbers)} numbers")
        self.atoms, self.mode_numbers = atoms, [int(m) for m in mode_numbers]
        self.box, self.apix, self.resolution_A = int(box), float(apix), float(resolution_A)
        self.data_scale = float(data_scale)
        centre = box_centre_A(self.box, self.apix)
        self.register_buffer("rel0_A", torch.as_tensor(atoms.xyz_A - centre, dtype=torch.float32))
        self.register_buffer("disp_A", torch.as_tensor(modes * math.sqrt(len(atoms)), dtype=torch.float32))
        self.register_buffer("weight", torch.as_tensor(atoms.weight, dtype=torch.float32))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))

    @property
    def latent_dim(self) -> int:
        return len(self.mode_numbers)

    @property
    def sigma_A(self) -> float:
        return SIGMA_PER_RESOLUTION * self.resolution_A

    def positions(self, z: torch.Tensor) -> torch.Tensor:
        """Atom positions (B, N, 3) Å relative to the box centre at amplitudes ``z`` (B, K) Å RMS."""
        return self.rel0_A + torch.einsum("bk,knj->bnj", z.to(self.disp_A.dtype), self.disp_A)

    def slices(self, rot: torch.Tensor, z: torch.Tensor | None, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices (B, M, 2) at RELION rotations ``rot`` (B, 3, 3), amplitudes ``z`` (B, K) Å and image
        frequencies ``kxy`` (M, 2) cycles/pixel of this model's box: the transforms of ``volumes(z)``."""
        if z is None:
            z = torch.zeros(len(rot), self.latent_dim, device=rot.device)
        out = gaussian_slices(rot.float(), self.positions(z), self.weight, self.sigma_A, kxy, self.apix,
                              box=self.box, lowpass_A=self.resolution_A)
        return out * self.log_scale.exp()

    @torch.no_grad()
    def frames_A(self, z: np.ndarray) -> np.ndarray:
        """Atom positions (M, N, 3) in the map frame (Å) at amplitudes ``z`` (M, K)."""
        z = torch.as_tensor(np.atleast_2d(np.asarray(z, np.float32)), device=self.disp_A.device)
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.latent_dim}")
        return self.positions(z).cpu().double().numpy() + box_centre_A(self.box, self.apix)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps (M, box, box, box) float32 (z, y, x) of the atoms at amplitudes ``z`` (M, K) Å RMS."""
        scale = float(self.log_scale.detach().exp()) * self.data_scale
        centre = box_centre_A(self.box, self.apix)
        return np.stack([scale * gaussian_map(x, self.atoms.weight, self.box, self.apix, self.resolution_A, centre)
                         for x in self.frames_A(z)]).astype(np.float32)

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the model (atomic) as safetensors."""
        tensors = {"coords_A": torch.as_tensor(self.atoms.xyz_A), "weight": torch.as_tensor(self.atoms.weight),
                   "modes": (self.disp_A.double() / math.sqrt(len(self.atoms))).cpu(),
                   "log_scale": self.log_scale.detach().cpu().reshape(1)}
        meta = {"format": MODEL_FORMAT, "box": str(self.box), "apix": repr(self.apix),
                "resolution_A": repr(self.resolution_A), "data_scale": repr(self.data_scale),
                "mode_numbers": json.dumps(self.mode_numbers),
                "atoms": json.dumps({k: np.asarray(getattr(self.atoms, k)).tolist() for k in ATOM_FIELDS}),
                **(extra or {})}
        return write_weights(path, tensors, meta)

    @staticmethod
    def load(path: str | Path) -> ModeModel:
        """Read a model written by ``save``; InputError when the file is not one."""
        tensors, meta = read_weights(path)
        if meta.get("format") != MODEL_FORMAT:
            raise InputError(path, f"not a cryohet normal-modes model (format {meta.get('format')!r})")
        names = json.loads(meta["atoms"])
        atoms = Atoms(tensors["coords_A"].double().numpy(), tensors["weight"].double().numpy(),
                      *(np.asarray(names[k]) for k in ATOM_FIELDS), source=Path(path))
        return ModeModel(atoms, tensors["modes"].numpy(), json.loads(meta["mode_numbers"]), int(meta["box"]),
                         float(meta["apix"]), float(meta["resolution_A"]), float(tensors["log_scale"].exp()),
                         float(meta.get("data_scale", 1.0)))

    def describe(self) -> dict[str, Any]:
        return {"n_atoms": len(self.atoms), "modes": self.mode_numbers, "box": self.box, "apix": self.apix,
                "resolution_A": self.resolution_A, "scale": float(self.log_scale.detach().exp())}


def load_run_model(run_dir: str | Path, model_path: str | Path) -> ModeModel:
    """The ``VolumeModel`` of a fit-modes run."""
    return ModeModel.load(model_path)
