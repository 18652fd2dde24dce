"""The basis-function hyper-molecule (survey section 7.1): V(τ, k) = Σ_{j,l} a_jl B_j(k) P_l(τ).

B_j is the Fourier basis of a cropped grid: one basis function per Fourier voxel of the working box inside the
resolution sphere (a band-limited basis whose central slices are exact trilinear reads of the coefficient grid,
so a slice of every l costs one interpolation pass, as for a map). P_l are the Legendre polynomials on [-1, 1],
orthonormal for the uniform measure (√(2l+1) P_l, P_0 = 1): the l = 0 map is the τ-average of the conformations.
The coefficients are stored as L = degree + 1 real-space maps M_l = Σ_j a_jl B_j at the working box, so
V(τ) = Σ_l P_l(τ) M_l; ``volumes`` pads them to the particles' box. One safetensors file holds them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.geometry.fourier import fourier_resize_3d
from cryohet.io.weights import read_weights, write_weights

MODEL_TYPE = "hypermolecule"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-hypermolecule-1"


def legendre_basis(tau: torch.Tensor, degree: int) -> torch.Tensor:
    """Orthonormal Legendre polynomials √(2l+1) P_l(τ), l = 0..degree, at ``tau`` (...) -> (..., degree + 1)."""
    p = [torch.ones_like(tau), tau]
    for n in range(1, degree):
        p.append(((2 * n + 1) * tau * p[n] - n * p[n - 1]) / (n + 1))
    scale = torch.sqrt(torch.arange(degree + 1, dtype=tau.dtype, device=tau.device) * 2 + 1)
    return torch.stack(p[:degree + 1], -1) * scale


def affine_legendre_transform(degree: int, scale: float, offset: float) -> np.ndarray:
    """T (L, L) with P(scale·t + offset) = T P(t) for the orthonormal Legendre vector P (both polynomials of
    degree ≤ ``degree``, so the fit on Gauss-Legendre nodes is exact): maps M' = Tᵀ M give V'(t) = V(scale·t +
    offset)."""
    t, w = np.polynomial.legendre.leggauss(degree + 2)
    old = legendre_basis(torch.as_tensor(scale * t + offset, dtype=torch.float64), degree).numpy()
    new = legendre_basis(torch.as_tensor(t, dtype=torch.float64), degree).numpy()
    return (old * w[:, None] / 2).T @ new  # ∫ P_old(t) P_new(t)ᵀ dt/2, the new basis orthonormal


class HyperMolecule:
    """L coefficient maps (L, n, n, n) at the working box ``n`` (Å/pixel ``work_apix``), maps at ``box``."""

    latent_dim = 1

    def __init__(self, maps: np.ndarray | torch.Tensor, box: int, apix: float, resolution_A: float,
                 info: dict[str, Any] | None = None):
        self.maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
        if self.maps.ndim != 4 or len(set(self.maps.shape[1:])) != 1:
            raise ValueError(f"hyper-molecule maps must be (L, n, n, n), got {tuple(self.maps.shape)}")
        self.box, self.apix, self.resolution_A = int(box), float(apix), float(resolution_A)
        self.info = dict(info or {})

    @property
    def degree(self) -> int:
        return len(self.maps) - 1

    @property
    def work_box(self) -> int:
        return int(self.maps.shape[-1])

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps V(τ) at τ = ``z`` (M, 1) in [-1, 1] -> float32 (M, box, box, box), RELION orientation."""
        tau = torch.as_tensor(np.asarray(z, dtype=np.float64).reshape(-1))
        if bool((tau.abs() > 1 + 1e-6).any()):
            raise ValueError(f"the hyper-molecule's τ lies in [-1, 1], got values up to {float(tau.abs().max()):g}")
        coef = legendre_basis(tau, self.degree).float()                 # (M, L)
        out = np.zeros((len(tau),) + (self.box,) * 3, np.float32)
        for i, v in enumerate(torch.einsum("ml,lxyz->mxyz", coef, self.maps)):
            out[i] = fourier_resize_3d(v, self.box).numpy()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the model (atomic) as safetensors."""
        meta = {"format": MODEL_FORMAT, "box": str(self.box), "apix": repr(self.apix),
                "resolution_A": repr(self.resolution_A), **{k: str(v) for k, v in self.info.items()}}
        return write_weights(path, {"maps": self.maps}, meta)

    @staticmethod
    def load(path: str | Path) -> HyperMolecule:
        """Read a model written by ``save``; InputError when the file is not one."""
        tensors, meta = read_weights(path)
        if meta.get("format") != MODEL_FORMAT or "maps" not in tensors:
            raise InputError(path, f"not a cryohet hyper-molecule (format {meta.get('format')!r})")
        try:
            return HyperMolecule(tensors["maps"].numpy(), int(meta["box"]), float(meta["apix"]),
                                 float(meta["resolution_A"]))
        except (KeyError, ValueError) as exc:
            raise InputError(path, f"cannot read the hyper-molecule ({exc})") from None


def load_run_model(run_dir: str | Path, model_path: str | Path) -> HyperMolecule:
    """The ``VolumeModel`` of a hypermolecule run."""
    return HyperMolecule.load(model_path)
