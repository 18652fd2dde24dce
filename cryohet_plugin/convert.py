"""Conversions between Scipion objects and the engine's files (STAR, MRC, run record).

The plugin talks to the engine only through files: it writes the input STAR with
scipion-em-relion's writer, and reads back the run record (``cryohet_run.json``) and the files it
lists. Nothing here imports the engine.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import numpy as np
from emtable import Table
from pwem.constants import ALIGN_PROJ

from .constants import ID_COLUMN, RELION_ID_COLUMN

RECORD_NAME = "cryohet_run.json"


def _relion_convert():
    """scipion-em-relion's convert module (imported late: it registers its own plugin)."""
    from pyworkflow.plugin import Domain

    return Domain.importFromPlugin("relion.convert", doRaise=True)


def _absolute_image_name(name: str, base: str | None = None) -> str:
    """``index@path`` with ``path`` made absolute (relative to ``base``, else the working folder)."""
    index, sep, path = name.rpartition("@")
    if not os.path.isabs(path):
        candidate = os.path.join(base, path) if base else path
        if base and not os.path.exists(candidate) and os.path.exists(path):
            candidate = path
        path = os.path.abspath(candidate)
    return f"{index}{sep}{path}"


def write_particles_star(particles, star_path: str, stacks_dir: str) -> list[int]:
    """Write ``particles`` (alignment and CTF) as a RELION 3.1 STAR for the engine.

    Stacks in formats RELION cannot read are converted into ``stacks_dir``, others linked there;
    image paths are absolute. Each row keeps the particle's Scipion id in ``cryohetScipionId``.
    Returns the ids in row order.
    """
    ids: list[int] = []

    def add_id(part, row) -> None:
        row[ID_COLUMN] = part.getObjId()
        if abs(float(row.get("rlnOriginZAngst", 0.0))) < 1e-6:
            row.pop("rlnOriginZAngst", None)  # 2-D images: the writer's zero z-origin only confuses readers
        row["rlnImageName"] = _absolute_image_name(row["rlnImageName"])
        ids.append(part.getObjId())

    os.makedirs(stacks_dir, exist_ok=True)
    _relion_convert().writeSetOfParticles(
        particles, star_path, outputDir=stacks_dir,
        alignType=ALIGN_PROJ if particles.hasAlignmentProj() else particles.getAlignment(),
        postprocessImageRow=add_id)
    # The writer processes the first particle twice (to build the header).
    return ids[1:]


def read_particles_star(star_path: str, particles, **kwargs: Any) -> None:
    """Fill ``particles`` (a new SetOfParticles) from a RELION 3.1 STAR written by the engine.

    Relative image paths are taken relative to the STAR's folder when they do not exist relative
    to the working folder (the engine writes stacks beside the STAR).
    """
    base = os.path.dirname(os.path.abspath(star_path))

    def fix_location(part, row) -> None:
        index, path = part.getLocation()
        if not os.path.isabs(path) and not os.path.exists(path):
            part.setLocation(index, os.path.join(base, path))

    _relion_convert().readSetOfParticles(star_path, particles, alignType=ALIGN_PROJ,
                                         postprocessImageRow=fix_location, **kwargs)


def star_table(star_path: str, table: str = "particles") -> Table:
    """Read one table of a STAR file (``particles``; falls back to the file's only/last table)."""
    try:
        return Table(fileName=star_path, tableName=table)
    except Exception:
        return Table(fileName=star_path)


def particle_ids(star_path: str) -> list[int] | None:
    """Scipion ids of the rows of a particles STAR, or None when it has no id column."""
    t = star_table(star_path)
    cols = set(t.getColumnNames())
    for col in (ID_COLUMN, RELION_ID_COLUMN):
        if col in cols:
            return [int(float(v)) for v in t.getColumnValues(col)]
    return None


def column(star_path: str, name: str, table: str = "particles") -> list[str] | None:
    t = star_table(star_path, table)
    return list(t.getColumnValues(name)) if name in t.getColumnNames() else None


def read_record(out_dir: str) -> dict[str, Any]:
    """The engine's run record as a dict; raise FileNotFoundError/ValueError with the path."""
    path = os.path.join(out_dir, RECORD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the engine wrote no run record")
    with open(path) as fh:
        record = json.load(fh)
    if not isinstance(record.get("outputs"), list):
        raise ValueError(f"{path}: malformed run record (no outputs list)")
    return record


def outputs_by_kind(record: dict[str, Any], out_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Outputs grouped by kind, each with ``file`` (under ``out_dir`` as given) and ``abspath`` added."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for out in record["outputs"]:
        out = dict(out)
        out["file"] = os.path.normpath(os.path.join(out_dir, out["path"]))
        out["abspath"] = os.path.abspath(out["file"])
        out.setdefault("meta", {})
        out.setdefault("label", "")
        groups[out["kind"]].append(out)
    return groups


def map_sampling(path: str) -> float | None:
    """Voxel size (Å) from an MRC header, None when absent or zero."""
    import mrcfile

    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        size = float(mrc.voxel_size.x)
    return size if size > 0 else None


def read_modes(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(modes (M, N, 3), collectivity (M,)) of a ``cryohet nma`` modes file (.npz of arrays only)."""
    with np.load(path, allow_pickle=False) as f:
        return np.asarray(f["modes"], dtype=np.float64), np.asarray(f["collectivity"], dtype=np.float64)


def load_latents(path: str) -> np.ndarray:
    """Latent coordinates (.npy, or text) as a 2-D array, one row per particle."""
    z = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
    z = np.asarray(z, dtype=float)
    return z.reshape(len(z), -1)


#: FSC columns of RELION STAR files and their labels.
FSC_COLUMNS = {"rlnFourierShellCorrelation": "FSC",
               "rlnFourierShellCorrelationCorrected": "corrected",
               "rlnFourierShellCorrelationUnmaskedMaps": "unmasked",
               "rlnFourierShellCorrelationMaskedMaps": "masked"}


def read_fsc(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(spatial frequency in 1/Å, {label: FSC curve}) from the engine's FSC file (.star or .json)."""
    if path.endswith(".json"):
        with open(path) as fh:
            data = json.load(fh)
        freq_key = next((k for k in ("freq", "frequency", "freq_invA") if isinstance(data, dict) and k in data), None)
        curves = {k: np.asarray(data[k], float) for k in ("fsc", "fsc_masked", "fsc_unmasked")
                  if freq_key and k in data}
        if not curves:
            raise ValueError(f"{path}: not an FSC curve (no freq and fsc arrays)")
        return np.asarray(data[freq_key], float), curves
    t = star_table(path, "fsc")
    cols = t.getColumnNames()

    def values(col: str) -> np.ndarray:
        return np.asarray([float(v) for v in t.getColumnValues(col)])

    curves = {label: values(col) for col, label in FSC_COLUMNS.items() if col in cols}
    if not curves:
        raise ValueError(f"{path}: no FSC column (one of {', '.join(FSC_COLUMNS)})")
    if "rlnResolution" in cols:
        freq = values("rlnResolution")
    else:
        res = values("rlnAngstromResolution")
        with np.errstate(divide="ignore"):
            freq = np.where(res > 0, 1.0 / res, 0.0)
    return freq, curves
