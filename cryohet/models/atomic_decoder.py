"""An atomic decoder (CryoSTAR / AtomVAE class): an MLP of the latent z gives every residue's displacement.

    x_i(z) = x0_i + MLP(z)_i        (Å, one Gaussian per residue of the reference model)

The reference ``atoms`` (a Cα selection: one node per residue, weighted by the electrons of its heavy atoms, as
``io.atomic_model.read_atoms(..., "ca")`` gives them) are in the particles' map frame. The MLP's last layer starts
at zero, so training starts at the reference. Rendering, slices, volumes and the file are
``models.displaced_atoms.DisplacedAtoms``' (as for ``models.modes.ModeModel``).

File: ``model.safetensors`` (the decoder's tensors, ``coords_A`` and ``weight`` of the reference; box, pixel size,
resolution, architecture and atom names in its metadata).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cryohet.io.atomic_model import Atoms
from cryohet.models.displaced_atoms import DisplacedAtoms
from cryohet.models.neural import ResidMLP, init_linear

MODEL_TYPE = "atomic_decoder"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-atomic-decoder-1"


class MLPDisplacedAtoms(DisplacedAtoms):
    """Reference ``atoms`` (map frame, Å) displaced by an MLP of z (``zdim``) with ``layers`` hidden layers of
    width ``dim``; weights drawn from ``seed``, the last layer zero (training starts at the reference). The base of
    the atomic decoder and of the Gaussian mixture of a map (``models.gaussian_mixture``); ``architecture`` holds
    the constructor's arguments (and ``n_atoms``), so subclasses that add arguments add them there."""

    def __init__(self, atoms: Atoms, box: int, apix: float, resolution_A: float, zdim: int, layers: int = 3,
                 dim: int = 256, seed: int = 0, scale: float = 1.0, data_scale: float = 1.0,
                 learn_weights: bool = False):
        super().__init__(atoms, box, apix, resolution_A, scale, data_scale, learn_weights)
        self.zdim, self.layers, self.dim, self.seed = int(zdim), int(layers), int(dim), int(seed)
        self.mlp = ResidMLP(self.zdim, self.layers, self.dim, 3 * len(atoms))
        init_linear(self.mlp, torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            self.mlp.out.weight.zero_()
            self.mlp.out.bias.zero_()

    @property
    def latent_dim(self) -> int:
        return self.zdim

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """Displacements (B, N, 3) Å of the atoms at latents ``z`` (B, zdim), float32."""
        return self.mlp(z).float().reshape(len(z), -1, 3)

    def architecture(self) -> dict[str, Any]:
        return {"n_atoms": len(self.atoms), "zdim": self.zdim, "layers": self.layers, "dim": self.dim,
                "box": self.box, "apix": self.apix, "resolution_A": self.resolution_A, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return {**self.architecture(), "scale": float(self.log_scale.detach().exp())}

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"decoder.{k}": v.detach().cpu() for k, v in self.state_dict().items()}

    def _file_meta(self) -> dict[str, str]:
        return {"architecture": json.dumps(self.architecture())}

    @classmethod
    def _from_file(cls, atoms: Atoms, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> MLPDisplacedAtoms:
        arch = {k: v for k, v in json.loads(meta["architecture"]).items() if k != "n_atoms"}
        model = cls(atoms, **arch, data_scale=float(meta.get("data_scale", 1.0)))
        model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
        return model


class AtomicDecoder(MLPDisplacedAtoms):
    """Reference residues (Cα nodes, fixed weights) displaced by an MLP of z."""

    MODEL_FORMAT, WHAT, WEIGHT_KEY = MODEL_FORMAT, "atomic-decoder", "atom_weight"


def load_run_model(run_dir: str | Path, model_path: str | Path) -> AtomicDecoder:
    """The ``VolumeModel`` of a train-atomic run."""
    return AtomicDecoder.load(model_path)
