"""Maps from a model of V(τ, r) at latent points: single maps, map series (movies) and ChimeraX scripts.

Works with any ``VolumeModel`` (``cryohet.models.base``): ``model.volumes(z (M, d)) -> (M, box, box, box)``.
Maps are written as MRC with the model's voxel size (``apix``, Å/pixel).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.data.loader import Progress
from cryohet.errors import InputError

if TYPE_CHECKING:
    from cryohet.models.base import VolumeModel

#: Default contour: the level above which this fraction of the box lies (median over the maps).
ENCLOSED_FRACTION = 0.02


def _no_progress(items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
    return items


# ---------------------------------------------------------------------------------------------------
# Latent points from the user


def parse_z(text: str, latent_dim: int | None = None, flag: str = "--z") -> np.ndarray:
    """Latent points from text: values separated by commas or spaces, points by ``;``.

    ``"0.1,0.2"`` is one point in 2-D, ``"0,0; 1,0"`` two. Returns float32 (M, d); raises ValueError
    naming ``flag`` when a value is not a number or a point does not have ``latent_dim`` values.
    """
    rows = []
    for i, chunk in enumerate(p for p in text.split(";") if p.strip()):
        parts = [v for v in re.split(r"[,\s]+", chunk.strip()) if v]
        try:
            rows.append([float(v) for v in parts])
        except ValueError:
            raise ValueError(f"{flag}: point {i + 1} ({chunk.strip()!r}) is not a list of numbers") from None
    if not rows:
        raise ValueError(f"{flag}: no latent point given")
    return _check_points(rows, latent_dim, flag)


def read_z_file(path: str | Path, latent_dim: int | None = None) -> np.ndarray:
    """Latent points (M, d) float32 from ``.npy`` or a text file (one point a line, values separated by
    spaces or commas; ``#`` comments). A single line or a 1-D array is one point."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "latent point file not found")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            text = re.sub(r"#.*", "", path.read_text())
            arr = np.array([[float(v) for v in re.split(r"[,\s]+", ln.strip()) if v]
                            for ln in text.splitlines() if ln.strip()], dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"cannot read latent points ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(path, f"expected latent points (M, d), got an array of shape {arr.shape}")
    try:
        return _check_points(arr, latent_dim, "latent point file")
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


def _check_points(rows: Any, latent_dim: int | None, what: str) -> np.ndarray:
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"{what}: the points have different numbers of values ({sorted(lengths)})")
    z = np.asarray(rows, dtype=np.float64)
    if latent_dim is not None and z.shape[1] != latent_dim:
        raise ValueError(f"{what}: points have {z.shape[1]} value(s) but the model's latent space has "
                         f"{latent_dim} dimension(s)")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{what}: non-finite value")
    return z.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Maps


def iter_volumes(model: VolumeModel, z: np.ndarray, batch: int = 1, progress: Progress | None = None,
                 desc: str = "volumes") -> Iterator[np.ndarray]:
    """Yield the maps (box, box, box) float32 of ``model`` at latent points ``z`` (M, d), in order,
    computing ``batch`` at a time (memory: batch·box³·4 bytes)."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    if z.shape[1] != model.latent_dim:
        raise ValueError(f"latent points have {z.shape[1]} value(s), the model expects {model.latent_dim}")
    progress = progress or _no_progress
    starts = range(0, z.shape[0], max(1, batch))
    for start in progress(starts, desc, len(starts)):
        vols = np.asarray(model.volumes(z[start:start + batch]), dtype=np.float32)
        expected = (min(batch, z.shape[0] - start),) + (model.box,) * 3
        if vols.shape != expected:
            raise RuntimeError(f"the model returned maps of shape {vols.shape}, expected {expected}")
        yield from vols


@dataclass
class VolumeSeries:
    """Maps written at latent points: ``files`` in order, ``z`` (M, d), voxel size ``apix`` (Å), and a
    suggested contour ``level`` (same for every map, so that changes along the series show)."""

    files: list[Path]
    z: np.ndarray
    apix: float
    level: float

    def register(self, ctx: Any, series: str, label: str, per_map: dict[str, list[Any]] | None = None,
                 **meta: Any) -> None:
        """Register each map as a ``volume_series`` output of ``ctx`` (a RunContext): meta ``series`` (the
        series name, shared), ``index``, ``n_maps``, ``z``, ``apix``, ``level``, the keywords ``meta``, the i-th
        value of each list in ``per_map``."""
        for i, f in enumerate(self.files):
            extra = {key: values[i] for key, values in (per_map or {}).items()}
            ctx.add("volume_series", f, f"{label} [{i}]", series=series, index=i, n_maps=len(self.files),
                    z=np.asarray(self.z[i], dtype=float).round(6).tolist(), apix=self.apix, level=self.level,
                    **extra, **meta)


def points_from_params(params: dict[str, Any], latent_dim: int) -> np.ndarray | None:
    """Latent points (M, d) float32 from ``--z`` (with ``--z_end``: ``--n_frames`` points on the straight path)
    or ``--z_file`` (``LATENT_POINT_PARAMS``); None when neither is given."""
    from cryohet.analysis.latent import linear_path

    if params["z"] is not None and params["z_file"] is not None:
        raise ValueError("give at most one of --z and --z_file")
    if params["z_end"] is not None and params["z"] is None:
        raise ValueError("--z_end needs --z (the start of the path)")
    if params["z_file"] is not None:
        return read_z_file(params["z_file"], latent_dim)
    if params["z"] is None:
        return None
    z = parse_z(params["z"], latent_dim, "--z")
    if params["z_end"] is None:
        return z
    if len(z) != 1:
        raise ValueError("--z must be one point when --z_end is given")
    end = parse_z(params["z_end"], latent_dim, "--z_end")
    return linear_path(np.concatenate([z, end]), params["n_frames"]).astype(np.float32)


def register_series(ctx: Any, files: list[Path], z: np.ndarray, apix: float, levels: list[float], series: str,
                    label: str, cxc: Path, title: str, per_map: dict[str, list[Any]] | None = None) -> VolumeSeries:
    """Register maps ``files`` at latent points ``z`` as one volume series of ``ctx`` at one contour level (the
    median of the maps' own ``levels``), with a ChimeraX script ``cxc`` that opens them as a series."""
    vs = VolumeSeries(list(files), np.atleast_2d(np.asarray(z, dtype=np.float32)), float(apix),
                      float(np.median(levels)))
    vs.register(ctx, series, label, per_map)
    ctx.add("chimerax", write_chimerax_script(cxc, vs.files, vs.level, title=title),
            "ChimeraX: the maps as a series", series=series, n_maps=len(vs.files))
    return vs


def contour_level(vol: np.ndarray, enclosed: float = ENCLOSED_FRACTION) -> float:
    """The value above which the fraction ``enclosed`` of the map's voxels lies."""
    flat = np.asarray(vol, dtype=np.float32).ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 1_000_000]
    return float(np.quantile(flat, 1.0 - enclosed))


def write_volume_series(model: VolumeModel, z: np.ndarray, folder: str | Path, prefix: str = "vol",
                        progress: Progress | None = None, desc: str = "volumes", batch: int = 1) -> VolumeSeries:
    """Write the maps of ``model`` at ``z`` (M, d) as ``folder/<prefix>_000.mrc`` ... (voxel size
    ``model.apix`` Å); the index has at least 3 digits (more when M > 1000) so names sort in order."""
    from cryohet.io.mrc import write_map

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    width = max(3, len(str(z.shape[0] - 1)))
    files, levels = [], []
    for i, vol in enumerate(iter_volumes(model, z, batch, progress, desc)):
        path = folder / f"{prefix}_{i:0{width}d}.mrc"
        write_map(path, vol, float(model.apix))
        files.append(path)
        levels.append(contour_level(vol))
    return VolumeSeries(files, z, float(model.apix), float(np.median(levels)))


def write_series(ctx: Any, model: VolumeModel, z: np.ndarray, name: str, label: str, batch: int = 1,
                 per_map: dict[str, list[Any]] | None = None, title: str = "cryohet", **meta: Any) -> VolumeSeries:
    """Write maps at ``z`` into ``<out>/<name>/vol_XXX.mrc`` with a ChimeraX script, and register both with
    ``ctx`` (a RunContext; the maps as the volume series ``name``, see ``VolumeSeries.register``)."""
    folder = Path(ctx.out_dir) / name
    series = write_volume_series(model, z, folder, progress=ctx.progress, desc=f"maps {name}", batch=batch)
    series.register(ctx, name, label, per_map, **meta)
    cxc = write_chimerax_script(folder / f"{name}.cxc", series.files, series.level, title=f"{title}: {label}")
    ctx.add("chimerax", cxc, f"ChimeraX: {label}", series=name, n_maps=len(series.files))
    return series


# ---------------------------------------------------------------------------------------------------
# ChimeraX


def write_chimerax_script(path: str | Path, map_files: list[Path], level: float | None = None,
                          color: str = "#7fa7d8", title: str = "") -> Path:
    """Write a ChimeraX command script that opens ``map_files`` as one volume series.

    ChimeraX runs a ``.cxc`` from its own folder, so the maps are named relative to it. The script
    sets one contour ``level`` for all maps and opens the series slider (play/record a movie there).
    """
    path = Path(path)
    base = path.parent.resolve()
    names = []
    for f in map_files:
        rel = Path(f).resolve()
        try:
            name = rel.relative_to(base).as_posix()
        except ValueError:
            name = rel.as_posix()
        names.append(f'"{name}"' if any(c.isspace() for c in name) else name)
    if not names:
        raise ValueError("no maps to put in a ChimeraX script")
    lines = [f"# {title}" if title else "# cryohet volume series",
             "# Open with ChimeraX: open " + path.name + "  (the series becomes model #1 in a new session)",
             f"open {' '.join(names)} vseries true"]
    style = f"volume #1 style surface color {color}"
    if level is not None:
        style += f" level {level:.6g}"
    lines += [style, "view", "vseries slider #1", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
