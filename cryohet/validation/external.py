"""Reading other tools' results for scoring: latent files (.npy, .txt, cryoDRGN's z.N.pkl), folders of
volumes, and cryoDRGN decoders (run through ``cryodrgn eval_vol`` when cryoDRGN is installed).

cryoDRGN writes its latents with ``pickle.dump(z, f)``. A pickle can run any code when loaded, so
``load_numpy_pickle`` uses a restricted unpickler that builds nothing but numpy arrays, numpy scalars,
tuples and lists; never load such a file with plain ``pickle.load``.
"""
from __future__ import annotations

import io
import logging
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.errors import InputError

#: The only globals a latent pickle may name: numpy's array, dtype and scalar reconstructors
#: (numpy 1.x ``numpy.core`` and numpy 2.x ``numpy._core`` spellings; ``_frombuffer`` is what
#: pickle protocol 5 uses for arrays).
_ALLOWED_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array/dtype/scalar reconstructors."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent references")


def _check_numeric(obj: object) -> None:
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _check_numeric(item)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"array of dtype {obj.dtype} is not numeric")
    elif not isinstance(obj, (np.generic, int, float)):
        raise pickle.UnpicklingError(f"unexpected object of type {type(obj).__name__}")


def load_numpy_pickle(path: str | Path) -> np.ndarray | list | tuple:
    """Load a pickle that holds only numpy arrays (or tuples/lists of them), e.g. cryoDRGN's z.N.pkl.

    Raises InputError when the file names anything else (a pickle that would call os.system, a class).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
        _check_numeric(obj)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(path, f"not a plain numpy pickle: {exc}") from None
    return obj


def load_latents(path: str | Path) -> np.ndarray:
    """Per-particle latents (N, d) float32 from .npy, .txt/.csv (whitespace or commas) or .pkl
    (cryoDRGN ``z.N.pkl``, read with the restricted unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "latent file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            z = np.load(path, allow_pickle=False)
        elif suffix == ".pkl":
            z = load_numpy_pickle(path)
            if isinstance(z, (list, tuple)):
                z = z[0]  # cryoDRGN writes (z_mu, z_logvar) in some versions
        elif suffix in (".txt", ".csv", ".dat"):
            z = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
        else:
            raise InputError(path, "unknown latent file type (use .npy, .txt, .csv or cryoDRGN .pkl)")
    except ValueError as exc:
        raise InputError(path, f"cannot read latents ({exc})") from None
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or len(z) == 0:
        raise InputError(path, f"latents must be a (N, d) array, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise InputError(path, "latents hold NaN or infinite values")
    return z


def load_labels(path: str | Path) -> np.ndarray:
    """Per-particle integer labels (N,) from .npy, .txt or .pkl (cryoDRGN's kmeans labels.pkl)."""
    z = load_latents(path)
    if z.shape[1] != 1 or not np.all(z == np.round(z)) or z.min() < 0:
        raise InputError(path, "labels must be one non-negative integer per particle")
    return z[:, 0].astype(np.int64)


def list_volumes(folder: str | Path) -> list[Path]:
    """The MRC maps in a folder, in name order (vol_000.mrc, vol_001.mrc, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "volume folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".mrc", ".map") and not p.name.startswith("."))
    if not files:
        raise InputError(folder, "no .mrc volumes in the folder")
    return files


def cryodrgn_executable() -> str:
    """Path of the ``cryodrgn`` executable; InputError when cryoDRGN is not installed."""
    exe = shutil.which("cryodrgn")
    if exe is None:
        raise InputError(None, "scoring a cryoDRGN decoder needs cryoDRGN itself: the 'cryodrgn' executable "
                               "is not on PATH (install cryoDRGN, or score its volumes with --volumes)")
    return exe


class CryoDRGNVolumeModel:
    """The maps of a trained cryoDRGN decoder, made by ``cryodrgn eval_vol`` (a subprocess).

    ``box`` and ``apix`` are those of the volumes it writes (the training box unless ``downsample``).
    """

    def __init__(self, weights: str | Path, config: str | Path, latent_dim: int, box: int, apix: float,
                 flip: bool = False, downsample: int | None = None, device: int | None = None,
                 log: logging.Logger | None = None):
        self.exe = cryodrgn_executable()
        self.weights, self.config = Path(weights), Path(config)
        for p in (self.weights, self.config):
            if not p.is_file():
                raise InputError(p, "cryoDRGN file not found")
        self.latent_dim, self.box, self.apix = int(latent_dim), int(downsample or box), float(apix)
        self.flip, self.downsample, self.device, self.log = flip, downsample, device, log

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps at latent points ``z`` (M, latent_dim) -> float32 (M, box, box, box)."""
        from cryohet.models.maps import read_map_array

        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        with tempfile.TemporaryDirectory(prefix="cryohet_eval_vol_") as tmp:
            zfile = Path(tmp) / "z.txt"
            np.savetxt(zfile, z)
            out = Path(tmp) / "vols"
            args = [self.exe, "eval_vol", str(self.weights), "-c", str(self.config), "-o", str(out),
                    "--zfile", str(zfile), "--Apix", f"{self.apix:g}"]
            if self.flip:
                args.append("--flip")
            if self.downsample:
                args += ["-d", str(self.downsample)]
            if self.device is not None:
                args += ["--device", str(self.device)]
            if self.log is not None:
                self.log.info("running %s", " ".join(args))
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"cryodrgn eval_vol failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            files = list_volumes(out)
            if len(files) != len(z):
                raise RuntimeError(f"cryodrgn eval_vol wrote {len(files)} volumes for {len(z)} latent points")
            return np.stack([read_map_array(f)[0] for f in files])
