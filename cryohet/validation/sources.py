"""Where a result's latents and maps come from: a cryohet run folder, plain arrays with a folder of maps,
or cryoDRGN outputs. Every source ends as per-particle latents plus a ``ParticleVolumes``: the map that
the result assigns to particle i. (The ``maps`` volume model, ``MapsModel``, is in cryohet.models.maps.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cryohet.errors import InputError
from cryohet.models.base import VolumeModel, load_volume_model, model_modules
from cryohet.models.maps import MODEL_TYPE as MAPS_MODEL_TYPE  # noqa: F401  (re-exported)
from cryohet.models.maps import MapsModel
from cryohet.record import read_record


def load_run_volume_model(run_dir: str | Path) -> VolumeModel:
    """The VolumeModel of a run, whatever its model type (``cryohet.models.base.load_volume_model``)."""
    return load_volume_model(run_dir)


def series_volume_model(run_dir: str | Path) -> MapsModel:
    """The maps of a run's first ``volume_series`` (record order) as a MapsModel at their latent points (meta
    ``z``): any latent gets the map of the nearest point (manifold-volumes' state maps at the state centres,
    manifold-images' kernel maps along its coordinate)."""
    run_dir = Path(run_dir)
    outs = read_record(run_dir).of_kind("volume_series")
    if not outs:
        raise InputError(run_dir, "the run has no volume model and no volume series to score")
    first = [o for o in outs if o.meta.get("series") == outs[0].meta.get("series")]
    first.sort(key=lambda o: int(o.meta.get("index", 0)))
    return MapsModel([run_dir / o.path for o in first], np.array([o.meta["z"] for o in first], dtype=np.float64))


def run_volume_model(run_dir: str | Path) -> VolumeModel:
    """The run's VolumeModel (``load_run_volume_model``) or, when its ``model`` output is not a volume model
    (manifold-images' free-energy landscape, manifold-volumes' volume embedding), its first volume series as
    maps at latent points (``series_volume_model``)."""
    models = read_record(run_dir).of_kind("model")
    if models and models[0].meta.get("model_type") not in model_modules():
        return series_volume_model(run_dir)
    return load_run_volume_model(run_dir)


def run_latents(run_dir: str | Path) -> np.ndarray:
    """The per-particle latents (N, d) a run registered (its first ``latents`` output)."""
    from cryohet.validation.external import load_latents

    run_dir = Path(run_dir)
    return load_latents(run_dir / read_record(run_dir).require("latents", run_dir, "latents").path)


class ParticleVolumes:
    """The map a result assigns to each particle: ``pv(idx)`` -> float32 (len(idx), box, box, box)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], box: int, apix: float, describe: str = ""):
        self._fn, self.box, self.apix, self.describe = fn, int(box), float(apix), describe

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        out = np.asarray(self._fn(np.asarray(idx, dtype=np.int64)), dtype=np.float32)
        if out.ndim != 4 or len(out) != len(idx):
            raise ValueError(f"{self.describe}: expected {len(idx)} maps, got an array of shape {out.shape}")
        return out

    @staticmethod
    def from_model(model: VolumeModel, latents: np.ndarray, describe: str = "volume model") -> ParticleVolumes:
        """Maps of a VolumeModel at each particle's latent."""
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape[1] != model.latent_dim:
            raise InputError(None, f"latents have {latents.shape[1]} coordinates but the {describe} has "
                                   f"{model.latent_dim}")
        return ParticleVolumes(lambda idx: model.volumes(latents[idx]), model.box, model.apix, describe)

    @staticmethod
    def from_labels(maps: Sequence[str | Path], labels: np.ndarray, apix: float | None = None,
                    describe: str = "volumes by label") -> ParticleVolumes:
        """Particle i gets map ``labels[i]`` of the list (e.g. a cluster's or class's map)."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.min() < 0 or labels.max() >= len(maps):
            raise InputError(None, f"labels run from {labels.min()} to {labels.max()} but there are "
                                   f"{len(maps)} volumes")
        model = MapsModel(maps, np.arange(len(maps), dtype=np.float64)[:, None], apix)
        return ParticleVolumes(lambda idx: np.stack([model.map(int(k)) for k in labels[idx]]), model.box,
                               model.apix, describe)
