"""The linear model of the volumes (survey section 5): V(b) = X_0 + sum_k b_k X_k.

``X_0`` is the mean map and ``X_k`` (k = 1..K) are orthonormal principal volumes (unit L2 norm over
voxels, mutually orthogonal); ``b`` are the per-particle coordinates, whose model variance along
``X_k`` is ``eigenvalues[k-1]``. The model is stored as one ``.npz`` file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError

MODEL_TYPE = "linear"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-linear-1"


@dataclass
class LinearModel:
    """Mean map plus K principal volumes, maps (z, y, x) in RELION orientation."""

    mean: np.ndarray            # (box, box, box) float32
    components: np.ndarray      # (K, box, box, box) float32, orthonormal
    eigenvalues: np.ndarray     # (K,) model variance of each coordinate b_k (map units^2)
    apix: float                 # Å/pixel
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.components = np.asarray(self.components, dtype=np.float32)
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)
        if self.mean.ndim != 3 or self.components.ndim != 4 or self.components.shape[1:] != self.mean.shape:
            raise ValueError(f"linear model: mean {self.mean.shape} and components {self.components.shape} disagree")
        if self.eigenvalues.shape != (self.components.shape[0],):
            raise ValueError("linear model: one eigenvalue per component is needed")

    @property
    def latent_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def box(self) -> int:
        return int(self.mean.shape[0])

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps ``X_0 + sum_k z_k X_k`` at latent points ``z`` (M, K) -> float32 (M, box, box, box)."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.latent_dim}")
        flat = self.components.reshape(self.latent_dim, -1)
        out = self.mean.reshape(1, -1) + z @ flat
        return out.reshape((len(z),) + self.mean.shape).astype(np.float32)

    def movie(self, k: int, taus: np.ndarray) -> np.ndarray:
        """Maps ``X_0 + tau X_k`` along component ``k`` (1-based), survey equation 6 -> (T, box, box, box)."""
        if not 1 <= k <= self.latent_dim:
            raise ValueError(f"component {k} is not in 1..{self.latent_dim}")
        taus = np.asarray(taus, dtype=np.float32).reshape(-1, 1)
        return (self.mean[None] + taus[..., None, None] * self.components[k - 1][None]).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the model (atomic) as ``.npz``."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, format=np.array(MODEL_FORMAT), mean=self.mean, components=self.components,
                     eigenvalues=self.eigenvalues, apix=np.float64(self.apix),
                     info_keys=np.array(list(self.info.keys()), dtype=str),
                     info_values=np.array([repr(v) for v in self.info.values()], dtype=str))
        return path

    @staticmethod
    def load(path: str | Path) -> LinearModel:
        """Read a model written by ``save``; InputError when the file is not one."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["format"]) != MODEL_FORMAT:
                    raise InputError(path, f"not a cryohet linear model (format {str(f['format'])!r})")
                info = dict(zip(f["info_keys"].tolist(), f["info_values"].tolist(), strict=True))
                return LinearModel(f["mean"], f["components"], f["eigenvalues"], float(f["apix"]), info)
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(path, f"cannot read the linear model ({exc})") from None


def load_run_model(run_dir: str | Path, model_path: str | Path) -> LinearModel:
    """The ``VolumeModel`` of a principal-volumes run."""
    return LinearModel.load(model_path)
