"""The ``maps`` volume model: a set of maps placed at latent points, the map at any latent being the one at
the nearest point (discrete classes, a folder of volumes or a map series, or the true maps of a benchmark).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.io.mrc import read_map

MODEL_TYPE = "maps"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-maps-1"


def read_map_array(path: str | Path) -> tuple[np.ndarray, float]:
    """(map float32 (z, y, x), Å/pixel) via the shared MRC reader."""
    vol, apix = read_map(path)
    return np.array(vol, dtype=np.float32), float(apix)  # a writable copy (not a view of the file)


class MapsModel:
    """A VolumeModel made of K maps at latent points ``centres`` (K, d): the map at z is the map whose
    centre is nearest to z (Euclidean)."""

    def __init__(self, maps: Sequence[str | Path] | np.ndarray, centres: np.ndarray, apix: float | None = None):
        centres = np.asarray(centres, dtype=np.float64)
        if centres.ndim == 1:
            centres = centres[:, None]
        if len(centres) != len(maps):
            raise ValueError(f"{len(maps)} maps but {len(centres)} latent centres")
        self.centres = centres
        self._cache: dict[int, np.ndarray] = {}
        if isinstance(maps, np.ndarray):
            if maps.ndim != 4:
                raise ValueError(f"maps must be (K, box, box, box), got {maps.shape}")
            self.paths: list[Path] | None = None
            self._cache = {i: np.asarray(m, dtype=np.float32) for i, m in enumerate(maps)}
            if apix is None:
                raise ValueError("apix is needed with maps given as an array")
            self.apix, self.box = float(apix), int(maps.shape[-1])
        else:
            self.paths = [Path(p) for p in maps]
            first, file_apix = read_map_array(self.paths[0])
            self._cache[0] = first
            self.apix, self.box = float(apix or file_apix), int(first.shape[-1])
        self.latent_dim = int(centres.shape[1])

    def map(self, k: int, keep: bool = True) -> np.ndarray:
        """Map number ``k`` (read once and kept, unless ``keep`` is False)."""
        if k in self._cache:
            return self._cache[k]
        vol, _ = read_map_array(self.paths[k])  # type: ignore[index]
        if vol.shape != (self.box,) * 3:
            raise InputError(self.paths[k], f"map of shape {vol.shape}, the others are {(self.box,) * 3}")
        if keep:
            self._cache[k] = vol
        return vol

    def labels(self, z: np.ndarray) -> np.ndarray:
        """Index of the nearest centre for each latent point (M,)."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.latent_dim}")
        d2 = ((z[:, None, :] - self.centres[None]) ** 2).sum(axis=2)
        return np.argmin(d2, axis=1)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps at latent points ``z`` (M, latent_dim) -> float32 (M, box, box, box)."""
        return np.stack([self.map(int(k)) for k in self.labels(z)])

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (map paths relative to the file's folder when below it)."""
        if self.paths is None:
            raise ValueError("only a MapsModel of map files can be saved")
        path = Path(path)
        base = path.parent.resolve()

        def rel(p: Path) -> str:
            p = p.resolve()
            return p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)

        doc = {"format": MODEL_FORMAT, "apix": self.apix, "maps": [rel(p) for p in self.paths],
               "centres": self.centres.tolist()}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1))
        return path

    @staticmethod
    def load(path: str | Path) -> MapsModel:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != MODEL_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {MODEL_FORMAT}")
            maps = [Path(p) if Path(p).is_absolute() else path.parent / p for p in doc["maps"]]
            return MapsModel(maps, np.asarray(doc["centres"], dtype=np.float64), doc.get("apix"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"not a maps model ({exc})") from None


def load_run_model(run_dir: Path, model_path: Path) -> MapsModel:
    """The VolumeModel of a run whose ``model`` output has ``model_type`` ``maps`` (cryohet.models.base)."""
    return MapsModel.load(model_path)
