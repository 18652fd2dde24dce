"""RELION STAR files through ``starfile``: read 3.0 / 3.1+ / 5 particle tables, write 3.1 tables atomically.

``read_particles_table`` returns one row per particle with the optics-group values merged in (as RELION's
ObservationModel sees them), the original optics table, and the format version:
``"3.0"`` (no optics table), ``"3.1"`` (optics table, ``# version 30001`` or no version line), ``"4.0"``, ``"5.0"``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryohet.atomic import atomic_path, temporary_beside
from cryohet.errors import InputError

WRITE_VERSION = 30001  # RELION 3.1 format, read by RELION 3.1, 4 and 5


def _format_float(value: float) -> str:
    """10 significant digits; integral values keep a decimal point so that floats read back as floats."""
    text = f"{value:.10g}"
    return text + ".0" if text.lstrip("-").isdigit() else text


# optics-group fields RELION 3.1+ keeps in data_optics (3.0 files have them per particle)
OPTICS_FIELDS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                 "rlnImageSize", "rlnImageDimensionality", "rlnMagnification", "rlnDetectorPixelSize")
# labels that only subtomogram / tilt-series STAR files have
TOMO_LABELS = ("rlnTomoName", "rlnTomoParticleName", "rlnTomoParticleId", "rlnTomoSubtomogramBinning",
               "rlnTomoVisibleFrames", "rlnCoordinateZ", "rlnOriginZ", "rlnOriginZAngst", "rlnTomoTiltSeriesName")
ZERO_OK_LABELS = ("rlnCoordinateZ", "rlnOriginZ", "rlnOriginZAngst")

_VERSION_RE = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file as DataFrames keyed by block name (``data_`` alone gives key ``""``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a regular file")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile / pandas parser errors
        raise InputError(path, f"unreadable STAR file ({type(e).__name__}: {e})") from e
    out: dict[str, pd.DataFrame] = {}
    for name, block in blocks.items():
        out[name] = block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])
    if not out:
        raise InputError(path, "STAR file holds no data blocks")
    return out


def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame], version: int | None = WRITE_VERSION) -> None:
    """Write data blocks atomically; each block is preceded by ``# version <version>`` as RELION writes it."""
    path = Path(path)
    for name, df in blocks.items():
        bad = [c for c in df.columns if not isinstance(c, str) or not c or any(ch.isspace() for ch in c)]
        if bad:
            raise ValueError(f"block {name!r}: invalid STAR labels {bad}")
    with atomic_path(path) as tmp:
        body = temporary_beside(path, ".body.star")
        try:
            starfile.write({k: v for k, v in blocks.items()}, body, overwrite=True, float_format=_format_float,
                           sep=" ")
            with open(body) as src, open(tmp, "w") as dst:
                for line in src:
                    if version is not None and line.startswith("data_"):
                        dst.write(f"# version {version}\n\n")
                    dst.write(line)
        finally:
            Path(body).unlink(missing_ok=True)


def star_version(path: str | os.PathLike) -> int | None:
    """The number in the first ``# version N`` line of the file (looked for in its first 64 kB), else None."""
    with open(path, errors="replace") as f:
        head = f.read(1 << 16)
    m = _VERSION_RE.search(head)
    return int(m.group(1)) if m else None


def _version_label(has_optics: bool, number: int | None) -> str:
    if not has_optics:
        return "3.0"
    if number is None or number // 10000 <= 3:
        return "3.1"
    return f"{number // 10000}.0"


def read_particle_blocks(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """The original particles table, the optics table (None for 3.0 files) and the version label."""
    path = Path(path)
    blocks = read_star(path)
    if "optics" in blocks or "particles" in blocks:
        if "particles" not in blocks:
            raise InputError(path, f"has a data_optics block but no data_particles block (blocks: {list(blocks)})")
        particles, optics = blocks["particles"], blocks.get("optics")
    else:
        optics = None
        tables = {k: v for k, v in blocks.items() if len(v.columns) > 1 or len(v) > 1}
        with_images = {k: v for k, v in tables.items() if "rlnImageName" in v.columns}
        candidates = with_images or tables
        if len(candidates) != 1:
            raise InputError(path, "cannot tell which data block holds the particles (blocks: "
                                   f"{', '.join(repr('data_' + k) for k in blocks)})")
        particles = next(iter(candidates.values()))
    _refuse_tomography(path, particles, optics)
    return particles, optics, _version_label(optics is not None, star_version(path))


def _refuse_tomography(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> None:
    tables = [particles] if optics is None else [particles, optics]
    # 2-D writers (scipion-em-relion) may add all-zero Z origins/coordinates: only non-zero ones mean 3-D
    tomo = [c for c in TOMO_LABELS for t in tables if c in t.columns
            and not (c in ZERO_OK_LABELS and (pd.to_numeric(t[c], errors="coerce").fillna(0) == 0).all())]
    dims = None
    if optics is not None and "rlnImageDimensionality" in optics.columns:
        dims = set(pd.to_numeric(optics["rlnImageDimensionality"], errors="coerce").dropna().astype(int))
    if tomo or (dims and 3 in dims):
        what = f"columns {', '.join(tomo)}" if tomo else "rlnImageDimensionality 3"
        raise InputError(path, f"is a subtomogram / tilt-series STAR file ({what}); cryohet reads "
                               "single-particle 2-D images only")
    # Tilt series exported as 2-D particles (Warp / RELION 3 style): every particle group holds one image from
    # each of several micrographs (the tilts), where single-particle groups hold many particles per micrograph.
    if {"rlnGroupName", "rlnMicrographName"} <= set(particles.columns) and len(particles) >= 3:
        g = particles.groupby("rlnGroupName", sort=False)["rlnMicrographName"]
        sizes, distinct = g.size(), g.nunique()
        big = sizes >= 3
        if big.any() and bool((distinct[big] == sizes[big]).all()):
            raise InputError(path, "is a tilt-series STAR file (each particle group rlnGroupName holds one image "
                                   f"from each of {int(sizes[big].median())} micrographs, i.e. tilts); cryohet "
                                   "reads single-particle images only")


def merge_optics(path: str | os.PathLike, particles: pd.DataFrame, optics: pd.DataFrame | None) -> pd.DataFrame:
    """One row per particle with optics values merged in and derived ``rlnImagePixelSize`` / Å origins.

    Particle columns win over optics columns of the same name. In 3.0 files the pixel size comes from
    ``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification``; origins in pixels (``rlnOriginX/Y``) are
    converted to ``rlnOriginXAngst/YAngst`` with the pixel size.
    """
    path = Path(path)
    merged = particles.copy()
    if optics is not None:
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(path, "data_optics has no rlnOpticsGroup column")
        table = optics.copy()
        table["rlnOpticsGroup"] = pd.to_numeric(table["rlnOpticsGroup"], errors="coerce")
        if table["rlnOpticsGroup"].isna().any() or table["rlnOpticsGroup"].duplicated().any():
            raise InputError(path, "data_optics has missing, non-numeric or repeated rlnOpticsGroup values")
        table = table.set_index(table["rlnOpticsGroup"].astype(np.int64))
        if "rlnOpticsGroup" in merged.columns:
            groups = pd.to_numeric(merged["rlnOpticsGroup"], errors="coerce")
            if groups.isna().any():
                raise InputError(path, "data_particles has missing or non-numeric rlnOpticsGroup values")
            groups = groups.astype(np.int64)
        elif len(table) == 1:
            groups = pd.Series(np.full(len(merged), table.index[0]), index=merged.index)
        else:
            raise InputError(path, "data_particles has no rlnOpticsGroup column but data_optics has several groups")
        unknown = sorted(set(groups.unique().tolist()) - set(table.index.tolist()))
        if unknown:
            raise InputError(path, f"particles refer to optics groups {unknown} that data_optics does not define")
        for col in table.columns:
            if col != "rlnOpticsGroup" and col not in merged.columns:
                merged[col] = table[col].reindex(groups.to_numpy()).to_numpy()
    if "rlnImagePixelSize" not in merged.columns and {"rlnMagnification", "rlnDetectorPixelSize"} <= set(merged):
        mag = pd.to_numeric(merged["rlnMagnification"], errors="coerce").to_numpy(np.float64)
        det_um = pd.to_numeric(merged["rlnDetectorPixelSize"], errors="coerce").to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            merged["rlnImagePixelSize"] = det_um * 1e4 / mag
    for axis in ("X", "Y"):
        px, ang = f"rlnOrigin{axis}", f"rlnOrigin{axis}Angst"
        if ang not in merged.columns and px in merged.columns and "rlnImagePixelSize" in merged.columns:
            merged[ang] = (pd.to_numeric(merged[px], errors="coerce").to_numpy(np.float64)
                           * pd.to_numeric(merged["rlnImagePixelSize"], errors="coerce").to_numpy(np.float64))
    return merged


def read_particles_table(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """``(particles with optics merged per particle, original optics table or None, version label)``.

    Subtomogram and tilt-series STAR files are refused with an ``InputError``.
    """
    particles, optics, version = read_particle_blocks(path)
    return merge_optics(path, particles, optics), optics, version
