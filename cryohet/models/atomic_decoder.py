"""An atomic decoder (CryoSTAR / AtomVAE class): an MLP of the latent z gives every residue's displacement.

    x_i(z) = x0_i + MLP(z)_i        (Å, one Gaussian per residue of the reference model)

The reference ``atoms`` (a Cα selection: one node per residue, weighted by the electrons of its heavy atoms, as
``io.atomic_model.read_atoms(..., "ca")`` gives them) are in the particles' map frame. The MLP's last layer starts
at zero, so training starts at the reference. Each node is an isotropic Gaussian of width
``SIGMA_PER_RESOLUTION · resolution_A``; ``slices`` are the analytic central slices of ``geometry.gaussian_slices``
and ``volumes`` the maps ``geometry.gaussians.gaussian_map`` renders (the same function below the resolution),
times the intensity scale ``exp(log_scale)`` (fitted) and ``data_scale`` (the particles' transform RMS), as
``models.modes.ModeModel`` does for normal modes.

File: ``model.safetensors`` (the decoder's tensors, ``coords_A`` and ``weight`` of the reference; box, pixel size,
resolution, architecture and atom names in its metadata).
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
from cryohet.models.neural import ResidMLP, init_linear

MODEL_TYPE = "atomic_decoder"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-atomic-decoder-1"


class AtomicDecoder(nn.Module):
    """Reference ``atoms`` (map frame, Å) displaced by an MLP of z (``zdim``) with ``layers`` hidden layers of
    width ``dim``; weights drawn from ``seed``, the last layer zero."""

    def __init__(self, atoms: Atoms, box: int, apix: float, resolution_A: float, zdim: int, layers: int = 3,
                 dim: int = 256, seed: int = 0, scale: float = 1.0, data_scale: float = 1.0):
        super().__init__()
        self.atoms = atoms
        self.box, self.apix, self.resolution_A = int(box), float(apix), float(resolution_A)
        self.zdim, self.layers, self.dim, self.seed = int(zdim), int(layers), int(dim), int(seed)
        self.data_scale = float(data_scale)
        centre = box_centre_A(self.box, self.apix)
        self.register_buffer("rel0_A", torch.as_tensor(atoms.xyz_A - centre, dtype=torch.float32))
        self.register_buffer("weight", torch.as_tensor(atoms.weight, dtype=torch.float32))
        self.mlp = ResidMLP(self.zdim, self.layers, self.dim, 3 * len(atoms))
        init_linear(self.mlp, torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            self.mlp.out.weight.zero_()
            self.mlp.out.bias.zero_()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))

    @property
    def latent_dim(self) -> int:
        return self.zdim

    @property
    def sigma_A(self) -> float:
        return SIGMA_PER_RESOLUTION * self.resolution_A

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """Displacements (B, N, 3) Å of the residues at latents ``z`` (B, zdim), float32."""
        return self.mlp(z).float().reshape(len(z), -1, 3)

    def positions(self, z: torch.Tensor) -> torch.Tensor:
        """Residue positions (B, N, 3) Å relative to the box centre at latents ``z`` (B, zdim)."""
        return self.rel0_A + self.displacements(z)

    def slices(self, rot: torch.Tensor, z: torch.Tensor | None, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices (B, M, 2) at RELION rotations ``rot`` (B, 3, 3), latents ``z`` (B, zdim) (None: the
        reference) and image frequencies ``kxy`` (M, 2) cycles/pixel: the transforms of ``volumes(z)``."""
        return self.slices_at(rot, self.rel0_A if z is None else self.positions(z), kxy)

    def slices_at(self, rot: torch.Tensor, pos_A: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices (B, M, 2) of the residues at positions ``pos_A`` ((N, 3) or (B, N, 3), Å from the box
        centre), times the intensity scale."""
        # phases 2πk·r reach tens of radians: float32 even under autocast
        with torch.autocast(rot.device.type, enabled=False):
            out = gaussian_slices(rot.float(), pos_A.float(), self.weight, self.sigma_A, kxy.float(), self.apix,
                                  box=self.box, lowpass_A=self.resolution_A)
        return out * self.log_scale.exp()

    @torch.no_grad()
    def frames_A(self, z: np.ndarray) -> np.ndarray:
        """Residue positions (M, N, 3) in the map frame (Å) at latents ``z`` (M, zdim)."""
        z = torch.as_tensor(np.atleast_2d(np.asarray(z, np.float32)), device=self.rel0_A.device)
        if z.shape[1] != self.zdim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.zdim}")
        return self.positions(z).cpu().double().numpy() + box_centre_A(self.box, self.apix)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps (M, box, box, box) float32 (z, y, x) of the displaced residues at latents ``z`` (M, zdim), on the
        particles' scale."""
        scale = float(self.log_scale.detach().exp()) * self.data_scale
        centre = box_centre_A(self.box, self.apix)
        return np.stack([scale * gaussian_map(x, self.atoms.weight, self.box, self.apix, self.resolution_A, centre)
                         for x in self.frames_A(z)]).astype(np.float32)

    def architecture(self) -> dict[str, Any]:
        return {"n_atoms": len(self.atoms), "zdim": self.zdim, "layers": self.layers, "dim": self.dim,
                "box": self.box, "apix": self.apix, "resolution_A": self.resolution_A, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return {**self.architecture(), "scale": float(self.log_scale.detach().exp())}

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the model (atomic) as safetensors."""
        tensors = {f"decoder.{k}": v.detach().cpu() for k, v in self.state_dict().items()}
        tensors.update(coords_A=torch.as_tensor(self.atoms.xyz_A), atom_weight=torch.as_tensor(self.atoms.weight))
        meta = {"format": MODEL_FORMAT, "architecture": json.dumps(self.architecture()),
                "data_scale": repr(self.data_scale),
                "atoms": json.dumps({k: np.asarray(getattr(self.atoms, k)).tolist() for k in ATOM_FIELDS}),
                **(extra or {})}
        return write_weights(path, tensors, meta)

    @staticmethod
    def load(path: str | Path) -> AtomicDecoder:
        """Read a model written by ``save``; InputError when the file is not one."""
        tensors, meta = read_weights(path)
        if meta.get("format") != MODEL_FORMAT:
            raise InputError(path, f"not a cryohet atomic-decoder model (format {meta.get('format')!r})")
        arch, names = json.loads(meta["architecture"]), json.loads(meta["atoms"])
        atoms = Atoms(tensors["coords_A"].double().numpy(), tensors["atom_weight"].double().numpy(),
                      *(np.asarray(names[k]) for k in ATOM_FIELDS), source=Path(path))
        model = AtomicDecoder(atoms, arch["box"], arch["apix"], arch["resolution_A"], arch["zdim"], arch["layers"],
                              arch["dim"], arch["seed"], data_scale=float(meta.get("data_scale", 1.0)))
        model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
        return model


def load_run_model(run_dir: str | Path, model_path: str | Path) -> AtomicDecoder:
    """The ``VolumeModel`` of a train-atomic run."""
    return AtomicDecoder.load(model_path)
