"""Reference atoms displaced by a function of the latent z, rendered as Gaussians: the base of the atom models.

    x_i(z) = x0_i + d_i(z)        (Å, map frame; each subclass supplies ``displacements`` d(z))

Each atom is an isotropic Gaussian of width ``SIGMA_PER_RESOLUTION · resolution_A`` and weight its electrons;
``slices`` are the analytic central slices of ``geometry.gaussian_slices`` and ``volumes`` the maps
``geometry.gaussians.gaussian_map`` renders (the same function below the resolution), times the intensity scale
``exp(log_scale)`` (fitted to the data as the trainer sees it: transforms divided by ``data_scale``) and
``data_scale``, so that maps are on the particles' own scale. With ``learn_weights`` the atoms' weights are
parameters (fitted with the displacements) rather than fixed. ``projector`` chooses how slices are made: the
analytic sum (``analytic``, cost B·N·M), splatting (``splat``, ``geometry.splat``: cost B·N + B·box² log box,
the same slices within its aliasing, see docs/benchmarks.md) or ``auto`` (splatting once N·M reaches
``SPLAT_MIN_WORK``); it is a setting of the object, not of its file. Files are safetensors with the reference's
``coords_A`` and weights, the atoms' names and ``data_scale`` in the metadata, and what the subclass adds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from cryohet.errors import InputError
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION, gaussian_map
from cryohet.geometry.splat import splat_slices
from cryohet.io.atomic_model import Atoms, box_centre_A
from cryohet.io.normal_modes import ATOM_FIELDS
from cryohet.io.weights import read_weights, write_weights

PROJECTORS = ("analytic", "splat", "auto")
#: atoms × frequencies from which ``auto`` splats (the analytic sum is the faster one below; bench/bench_splat.py)
SPLAT_MIN_WORK = 50_000


class DisplacedAtoms(nn.Module):
    """Reference ``atoms`` (map frame, Å) in a box of ``box`` pixels of ``apix`` Å, rendered at ``resolution_A``.

    Subclasses set ``MODEL_FORMAT``, ``WHAT`` (for error messages), ``WEIGHT_KEY`` (the weights' tensor name in
    the file) and define ``latent_dim``, ``displacements``, ``describe``, ``_file_tensors``, ``_file_meta`` and
    ``_from_file``."""

    MODEL_FORMAT: ClassVar[str]
    WHAT: ClassVar[str]
    WEIGHT_KEY: ClassVar[str]

    def __init__(self, atoms: Atoms, box: int, apix: float, resolution_A: float, scale: float = 1.0,
                 data_scale: float = 1.0, learn_weights: bool = False, projector: str = "analytic"):
        super().__init__()
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {projector!r}")
        self.projector = projector
        self.atoms = atoms
        self.box, self.apix, self.resolution_A = int(box), float(apix), float(resolution_A)
        self.data_scale = float(data_scale)
        centre = box_centre_A(self.box, self.apix)
        self.register_buffer("rel0_A", torch.as_tensor(atoms.xyz_A - centre, dtype=torch.float32))
        weight = torch.as_tensor(atoms.weight, dtype=torch.float32)
        if learn_weights:  # the atoms' amplitudes are fitted too (pseudo-atoms of a map, voxels of a canonical map)
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))

    @property
    def latent_dim(self) -> int:
        raise NotImplementedError

    @property
    def sigma_A(self) -> float:
        return SIGMA_PER_RESOLUTION * self.resolution_A

    def displacements(self, z: torch.Tensor) -> torch.Tensor:
        """Displacements (B, N, 3) Å of the atoms at latents ``z`` (B, latent_dim), float32."""
        raise NotImplementedError

    def positions(self, z: torch.Tensor) -> torch.Tensor:
        """Atom positions (B, N, 3) Å relative to the box centre at latents ``z`` (B, latent_dim)."""
        return self.rel0_A + self.displacements(z)

    def slices(self, rot: torch.Tensor, z: torch.Tensor | None, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices (B, M, 2) at RELION rotations ``rot`` (B, 3, 3), latents ``z`` (B, latent_dim) (None:
        the reference) and image frequencies ``kxy`` (M, 2) cycles/pixel of this model's box: the transforms of
        ``volumes(z)``."""
        return self.slices_at(rot, self.rel0_A if z is None else self.positions(z), kxy)

    def slices_at(self, rot: torch.Tensor, pos_A: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """Central slices (B, M, 2) of the atoms at positions ``pos_A`` ((N, 3) or (B, N, 3), Å from the box
        centre), times the intensity scale; by ``self.projector``."""
        splat = self.projector == "splat" or (
            self.projector == "auto" and pos_A.shape[-2] * kxy.shape[0] >= SPLAT_MIN_WORK)
        project = splat_slices if splat else gaussian_slices
        # phases 2πk·r reach tens of radians: float32 even under autocast
        with torch.autocast(rot.device.type, enabled=False):
            out = project(rot.float(), pos_A.float(), self.weight, self.sigma_A, kxy.float(), self.apix,
                          box=self.box, lowpass_A=self.resolution_A)
        return out * self.log_scale.exp()

    @torch.no_grad()
    def frames_A(self, z: np.ndarray) -> np.ndarray:
        """Atom positions (M, N, 3) in the map frame (Å) at latents ``z`` (M, latent_dim)."""
        z = torch.as_tensor(np.atleast_2d(np.asarray(z, np.float32)), device=self.rel0_A.device)
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.latent_dim}")
        return self.positions(z).cpu().double().numpy() + box_centre_A(self.box, self.apix)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps (M, box, box, box) float32 (z, y, x) of the displaced atoms at latents ``z`` (M, latent_dim), on
        the particles' scale."""
        scale = float(self.log_scale.detach().exp()) * self.data_scale
        centre = box_centre_A(self.box, self.apix)
        weight = self.weight.detach().cpu().double().numpy()
        return np.stack([scale * gaussian_map(x, weight, self.box, self.apix, self.resolution_A, centre)
                         for x in self.frames_A(z)]).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _file_meta(self) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def _from_file(cls, atoms: Atoms, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> DisplacedAtoms:
        raise NotImplementedError

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the model (atomic) as safetensors; ``extra``: more metadata strings."""
        tensors = {**self._file_tensors(), "coords_A": torch.as_tensor(self.atoms.xyz_A),
                   self.WEIGHT_KEY: self.weight.detach().cpu().double()}
        meta = {"format": self.MODEL_FORMAT, **self._file_meta(), "data_scale": repr(self.data_scale),
                "atoms": json.dumps({k: np.asarray(getattr(self.atoms, k)).tolist() for k in ATOM_FIELDS}),
                **(extra or {})}
        return write_weights(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a model written by ``save``; InputError when the file is not one."""
        tensors, meta = read_weights(path)
        if meta.get("format") != cls.MODEL_FORMAT:
            raise InputError(path, f"not a cryohet {cls.WHAT} model (format {meta.get('format')!r})")
        names = json.loads(meta["atoms"])
        atoms = Atoms(tensors["coords_A"].double().numpy(), tensors[cls.WEIGHT_KEY].double().numpy(),
                      *(np.asarray(names[k]) for k in ATOM_FIELDS), source=Path(path))
        return cls._from_file(atoms, tensors, meta)
