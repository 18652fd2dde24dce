"""Particle sets: poses, CTF and lazily read images from a RELION STAR or cryoSPARC .cs file.

Image references ``N@path`` are 1-based, as in RELION. A relative ``path`` is looked for under ``datadir``
(also by its base name) when given, else beside the STAR file, else in the current directory (RELION's project
folder rule: paths are relative to where RELION runs). For ``.cs`` files ``blob/path`` is relative to the
cryoSPARC project: it is looked for under ``datadir`` and beside the ``.cs`` file, as given and by base name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryohet.errors import InputError
from cryohet.geometry.ctf import CTFParams
from cryohet.io.cryosparc import join_fields, read_cs, uid_from_image, write_cs
from cryohet.io.mrc import read_header
from cryohet.io.reader import ImageReader
from cryohet.io.star import merge_optics, read_particle_blocks, write_star

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast")
_CTF_OPTIONAL = {"phase_shift_deg": ("rlnPhaseShift", 0.0), "bfactor_A2": ("rlnCtfBfactor", 0.0),
                 "scale": ("rlnCtfScalefactor", 1.0)}
_REL_TOL = 1e-3


@dataclass(eq=False)
class ParticleSet:
    """Particles with poses, CTF, the original table and memory-mapped images (opened on first use)."""

    source: Path
    box: int
    apix: float
    euler_deg: np.ndarray
    shift_A: np.ndarray
    ctf: CTFParams
    stack_paths: list[Path]
    stack_id: np.ndarray
    stack_index: np.ndarray
    table: pd.DataFrame
    optics: pd.DataFrame | None
    source_format: str = "relion3.1"  # "relion3.0", "relion3.1" (3.1 and later) or "cryosparc"
    image_names: np.ndarray | None = None  # per stack: the path string as the source file wrote it
    _reader: ImageReader | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.stack_id)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None  # re-made lazily in the new process
        return state

    def _positions(self, idx) -> np.ndarray:
        if idx is None:
            return np.arange(len(self))
        pos = np.arange(len(self))[idx]
        return np.atleast_1d(pos).astype(np.int64)

    def reader(self) -> ImageReader:
        """The reader of this set's images (stack headers checked on first use)."""
        if self._reader is None:
            reader = ImageReader(self.stack_paths, self.stack_id, self.stack_index)
            if self.box and reader.box != self.box:
                raise InputError(self.stack_paths[0], f"images are {reader.box} px but the particle set has box "
                                                      f"{self.box} px")
            self.box = reader.box
            self._reader = reader
        return self._reader

    def images(self, idx) -> np.ndarray:
        """float32 images ``(B, box, box)`` of particles ``idx`` (indices, mask or slice), read from the stacks.

        Raises ``InputError`` naming the stack and image when an image is missing or holds NaN / inf.
        """
        return self.reader().read(self._positions(idx))

    def subset(self, idx) -> ParticleSet:
        """A new set of particles ``idx`` (table rows renumbered 0..B-1, unused stacks dropped)."""
        pos = self._positions(idx)
        used, new_id = np.unique(self.stack_id[pos], return_inverse=True)
        return ParticleSet(
            source=self.source, box=self.box, apix=self.apix, euler_deg=self.euler_deg[pos].copy(),
            shift_A=self.shift_A[pos].copy(), ctf=self.ctf.take(pos), stack_paths=[self.stack_paths[i] for i in used],
            stack_id=new_id.astype(np.int64), stack_index=self.stack_index[pos].copy(),
            table=self.table.iloc[pos].reset_index(drop=True), optics=self.optics, source_format=self.source_format,
            image_names=None if self.image_names is None else self.image_names[used])


# --------------------------------------------------------------------------------------------------- loading

def _numeric(path: Path, df: pd.DataFrame, col: str) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(v).all():
        row = int(np.flatnonzero(~np.isfinite(v))[0])
        raise InputError(path, f"column {col} has a missing or non-numeric value in particle row {row + 1} "
                               f"({df[col].iloc[row:row + 1].tolist()[0]!r})")
    return v


def _one_value(path: Path, values: np.ndarray, what: str, groups: pd.Series | None = None) -> float:
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo > _REL_TOL * max(abs(hi), 1e-12):
        detail = f"{lo:g} to {hi:g}"
        if groups is not None:
            per = pd.Series(values).groupby(groups.to_numpy()).first()
            detail = ", ".join(f"group {g}: {v:g}" for g, v in per.items())
        raise InputError(path, f"particles have different {what} ({detail}); cryohet needs one value: select "
                               "particles that share it (e.g. one optics group) first")
    return float(np.median(values))


def _parse_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``N@path`` -> (0-based index, path string); a name without ``@`` is image 1 of that file."""
    s = names.astype(str)
    has_at = s.str.contains("@", regex=False).to_numpy()
    parts = s.str.split("@", n=1)
    idx_str = np.where(has_at, parts.str[0].to_numpy(dtype=object), "1")
    files = np.where(has_at, parts.str[-1].to_numpy(dtype=object), s.to_numpy(dtype=object))
    idx = pd.to_numeric(pd.Series(idx_str), errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"rlnImageName {s.iloc[row]!r} in particle row {row + 1} is not 'N@file' with N >= 1")
    files = np.array([f.strip().split(":")[0] if f.strip().endswith((":mrcs", ":mrc")) else f.strip()
                      for f in files], dtype=object)
    return idx.astype(np.int64) - 1, files


def _candidates(ref: str, bases: list[Path], by_basename: list[Path]) -> list[Path]:
    p = Path(ref)
    if p.is_absolute():
        return [p]
    out = [b / p for b in bases]
    out += [b / p.name for b in by_basename if p.name != ref]
    return out


def _resolve(refs: np.ndarray, bases: list[Path], by_basename: list[Path]) -> dict[str, tuple[Path, list[Path]]]:
    """Each distinct reference -> (the first candidate that exists, or the first candidate; all candidates)."""
    out = {}
    for ref in pd.unique(refs):
        cands = _candidates(str(ref), bases, by_basename)
        found = next((c for c in cands if c.is_file()), cands[0])
        out[str(ref)] = (Path(os.path.abspath(found)), cands)
    return out


def _check_stacks(source: Path, paths: list[Path], cands: list[list[Path]], stack_id: np.ndarray,
                  stack_index: np.ndarray, box: int) -> int:
    """Every stack exists, is square, has one box size (= ``box`` if known), holds every index. Returns the box."""
    boxes: dict[int, list[Path]] = {}
    last = np.full(len(paths), -1, dtype=np.int64)
    np.maximum.at(last, stack_id, stack_index)  # the largest index used in each stack
    for sid, path in enumerate(paths):
        if not path.is_file():
            looked = ", ".join(str(c) for c in cands[sid][:4])
            raise InputError(path, f"image stack not found (referenced in {source}; looked in: {looked})")
        n, ny, nx = read_header(path).shape
        if nx != ny:
            raise InputError(path, f"images are not square: {nx} x {ny} pixels (x, y)")
        boxes.setdefault(nx, []).append(path)
        worst = int(last[sid])
        if worst >= n:
            raise InputError(path, f"image index {worst + 1} (as {worst + 1}@..., referenced in {source}) is past "
                                   f"the end of the stack, which holds {n} images")
    if len(boxes) > 1:
        detail = "; ".join(f"{b} px: {v[0].name}" + (f" and {len(v) - 1} more" if len(v) > 1 else "")
                           for b, v in sorted(boxes.items()))
        raise InputError(source, f"stacks of different box sizes ({detail})")
    found = next(iter(boxes))
    if box and found != box:
        raise InputError(paths[0], f"images are {found} px but the metadata in {source} says rlnImageSize {box}")
    return found


def _ctf_from_table(path: Path, merged: pd.DataFrame) -> CTFParams:
    missing = [c for c in CTF_COLUMNS if c not in merged.columns]
    if missing:
        raise InputError(path, f"no CTF parameters: missing column(s) {', '.join(missing)}")
    n = len(merged)
    values = {name: _numeric(path, merged, col) for name, col in zip(
        ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amp_contrast"), CTF_COLUMNS)}
    for name, (col, default) in _CTF_OPTIONAL.items():
        values[name] = _numeric(path, merged, col) if col in merged.columns else np.full(n, default)
    return CTFParams(**values)


def _load_star(path: Path, datadir: Path | None, check_images: bool, require_poses: bool) -> ParticleSet:
    raw, optics, version = read_particle_blocks(path)
    merged = merge_optics(path, raw, optics)
    n = len(merged)
    if n == 0:
        raise InputError(path, "holds no particles")
    missing = [c for c in POSE_COLUMNS if c not in merged.columns]
    if missing and require_poses:
        raise InputError(path, f"no particle poses: missing column(s) {', '.join(missing)}")
    euler = (np.full((n, 3), np.nan) if missing else
             np.stack([_numeric(path, merged, c) for c in POSE_COLUMNS], axis=1))
    ctf = _ctf_from_table(path, merged)
    if "rlnImageName" not in merged.columns:
        raise InputError(path, "no particle images: missing column rlnImageName")
    index0, refs = _parse_image_names(path, merged["rlnImageName"])
    bases = [datadir] if datadir is not None else [path.parent, Path.cwd()]
    codes, stack_paths, cands, names = _stack_table(refs, _resolve(refs, bases,
                                                                   [datadir] if datadir is not None else []))
    groups = merged["rlnOpticsGroup"] if "rlnOpticsGroup" in merged.columns else None

    box = 0
    if "rlnImageSize" in merged.columns:
        box = int(round(_one_value(path, _numeric(path, merged, "rlnImageSize"), "image sizes (rlnImageSize)",
                                   groups)))
    if check_images:
        box = _check_stacks(path, stack_paths, cands, codes, index0, box)
    elif not box:
        existing = [p for p in stack_paths if p.is_file()]
        box = read_header(existing[0]).nx if existing else 0
    if "rlnImagePixelSize" in merged.columns:
        apix = _one_value(path, _numeric(path, merged, "rlnImagePixelSize"), "pixel sizes (rlnImagePixelSize)",
                          groups)
    else:
        existing = [p for p in stack_paths if p.is_file()]
        apix = read_header(existing[0]).voxel_A[0] if existing else 0.0
        if not apix > 0:
            where = f"and the header of {existing[0]} says 0" if existing else "and no image stack was found"
            raise InputError(path, "no pixel size: the metadata has no rlnImagePixelSize (nor rlnMagnification "
                                   f"with rlnDetectorPixelSize) {where}")
    if not apix > 0:
        raise InputError(path, f"invalid pixel size {apix:g} Å in the metadata")
    if "rlnOriginXAngst" in merged.columns and "rlnOriginYAngst" in merged.columns:
        shift = np.stack([_numeric(path, merged, "rlnOriginXAngst"), _numeric(path, merged, "rlnOriginYAngst")], 1)
    elif "rlnOriginX" in merged.columns and "rlnOriginY" in merged.columns:
        shift = np.stack([_numeric(path, merged, "rlnOriginX"), _numeric(path, merged, "rlnOriginY")], 1) * apix
    else:
        shift = np.zeros((n, 2))
    return ParticleSet(source=path, box=int(box), apix=float(apix), euler_deg=euler, shift_A=shift, ctf=ctf,
                       stack_paths=stack_paths, stack_id=codes.astype(np.int64), stack_index=index0, table=raw,
                       optics=optics, source_format="relion3.0" if optics is None else "relion3.1",
                       image_names=names)


def _cs_table(records: np.ndarray) -> pd.DataFrame:
    cols = {}
    for name in records.dtype.names:
        v = np.asarray(records[name])
        if v.ndim == 1:
            cols[name] = [x.decode() for x in v] if v.dtype.kind == "S" else v
        else:
            for j in range(int(np.prod(v.shape[1:]))):
                cols[f"{name}/{j}"] = v.reshape(len(v), -1)[:, j]
    return pd.DataFrame(cols)


def _stack_table(refs, resolved: dict) -> tuple[np.ndarray, list[Path], list, np.ndarray]:
    """Per-particle stack number, the distinct resolved stacks, the candidates tried for each stack, and each
    stack's name as the source file wrote it."""
    keys = [str(r) for r in refs]
    codes, uniq_paths = pd.factorize(pd.Series([str(resolved[k][0]) for k in keys]))
    stack_paths = [Path(p) for p in uniq_paths]
    first_ref: dict[int, str] = {}
    for k, c in zip(keys, codes):
        first_ref.setdefault(int(c), k)
    written = np.array([first_ref[i] for i in range(len(stack_paths))], dtype=object)
    return codes, stack_paths, [resolved[first_ref[i]][1] for i in range(len(stack_paths))], written


def _load_cs(path: Path, datadir: Path | None, check_images: bool, require_poses: bool) -> ParticleSet:
    cs = read_cs(path, require_poses=require_poses)
    bases = ([datadir] if datadir is not None else []) + [path.parent]
    codes, stack_paths, cands, _ = _stack_table(cs["blob_path"], _resolve(cs["blob_path"], bases, bases))
    box = int(cs["box"])
    index0 = cs["blob_idx"]
    if check_images:
        box = _check_stacks(path, stack_paths, cands, codes, index0, box)
    ctf = CTFParams(**{k: cs[k] for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
                                          "amp_contrast", "phase_shift_deg", "bfactor_A2", "scale")})
    names = np.array([str(stack_paths[i]) for i in range(len(stack_paths))], dtype=object)
    return ParticleSet(source=path, box=box, apix=float(cs["apix"]), euler_deg=cs["euler_deg"],
                       shift_A=cs["shift_A"], ctf=ctf, stack_paths=stack_paths, stack_id=codes.astype(np.int64),
                       stack_index=index0.astype(np.int64), table=_cs_table(cs["records"]), optics=None,
                       source_format="cryosparc", image_names=names)


def load_particles(path: str | os.PathLike, datadir: str | os.PathLike | None = None, check_images: bool = True,
                   require_poses: bool = True) -> ParticleSet:
    """Load a RELION ``.star`` or cryoSPARC ``.cs`` particle file (dispatch on the suffix).

    Checks pose and CTF columns (``require_poses=False`` accepts files without poses; they are then NaN),
    and with ``check_images`` that every stack exists, is square, all have one box size and no index is past
    the end of its stack. The pixel size comes from the metadata, from a stack header only when the metadata
    has none (a header value of 0 is never used).
    """
    path = Path(os.path.abspath(path))
    ddir = Path(os.path.abspath(datadir)) if datadir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise InputError(ddir, "data folder not found")
    suffix = path.suffix.lower()
    if suffix == ".star":
        return _load_star(path, ddir, check_images, require_poses)
    if suffix == ".cs":
        return _load_cs(path, ddir, check_images, require_poses)
    raise InputError(path, f"unknown particle file type {suffix!r}: expected a RELION .star or a cryoSPARC .cs file")


# --------------------------------------------------------------------------------------------------- writing

def _optics_from_values(pset: ParticleSet, pos: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """One optics group per distinct (voltage, Cs, amplitude contrast) among particles ``pos``."""
    keys = np.stack([pset.ctf.voltage_kV[pos], pset.ctf.cs_mm[pos], pset.ctf.amp_contrast[pos]], 1)
    uniq, group0 = np.unique(np.round(keys, 6), axis=0, return_inverse=True)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
        "rlnOpticsGroupName": [f"opticsGroup{i}" for i in range(1, len(uniq) + 1)],
        "rlnAmplitudeContrast": uniq[:, 2], "rlnSphericalAberration": uniq[:, 1], "rlnVoltage": uniq[:, 0],
        "rlnImagePixelSize": np.full(len(uniq), pset.apix), "rlnImageSize": np.full(len(uniq), pset.box),
        "rlnImageDimensionality": np.full(len(uniq), 2)})
    return optics, group0.reshape(-1) + 1


def _image_name_column(pset: ParticleSet, pos: np.ndarray) -> np.ndarray:
    """``NNNNNN@path`` for particles ``pos``: the original path string when it still names the same file from the
    current folder (RELION resolves relative to where it runs), else the absolute path."""
    cwd = Path.cwd()
    per_stack = []
    for sid, resolved in enumerate(pset.stack_paths):
        orig = None if pset.image_names is None else str(pset.image_names[sid])
        if orig is not None and (not resolved.exists() or
                                 Path(os.path.abspath(cwd / orig)) == Path(os.path.abspath(resolved))):
            per_stack.append(orig)
        else:
            per_stack.append(str(resolved))
    per_stack = np.array(per_stack, dtype=object)
    idx = pset.stack_index[pos] + 1
    return np.array([f"{i:06d}@{p}" for i, p in zip(idx, per_stack[pset.stack_id[pos]])], dtype=object)


def write_particles_cs(path: str | os.PathLike, pset: ParticleSet, extra_columns: dict[str, np.ndarray] | None = None,
                       rows=None) -> None:
    """Write particles as a cryoSPARC ``.cs`` (``io.cryosparc.write_cs``), atomically.

    Rows ``rows`` (indices or mask; all when None). A set read from a ``.cs`` keeps its ``uid`` and every other
    field; one read from a STAR gets a ``uid`` derived from its image (the same particle has the same uid in every
    output), the resolved stack path, ``blob/sign`` −1 (as cryoSPARC's import gives RELION stacks,
    ``empiar_10076_7.cs``) and ``alignments3D/split`` from ``rlnRandomSubset``. The STAR's ``cryohet*`` columns
    and ``extra_columns`` (1-D, of length ``len(pset)`` or of the selected rows) become ``cryohet/<name>`` fields.
    """
    pos = pset._positions(rows)
    n = len(pos)
    columns: dict[str, np.ndarray] = {}
    if pset.source_format == "cryosparc":
        base = join_fields(pset.table.iloc[pos])
        base["blob/path"] = np.asarray(base["blob/path"], dtype=object)
    else:
        names = np.asarray(pset.image_names if pset.image_names is not None else
                           [str(p) for p in pset.stack_paths], dtype=object)
        stacks = np.array([str(p) for p in pset.stack_paths], dtype=object)
        base = {"uid": uid_from_image(names[pset.stack_id[pos]], pset.stack_index[pos]),
                "blob/path": stacks[pset.stack_id[pos]], "blob/idx": pset.stack_index[pos].astype(np.uint32),
                "blob/shape": np.full((n, 2), pset.box, dtype=np.uint32),
                "blob/psize_A": np.full(n, pset.apix, dtype=np.float32),
                "blob/sign": np.full(n, -1.0, dtype=np.float32)}
        columns = {c: pset.table[c].to_numpy()[pos] for c in pset.table.columns
                   if c.startswith("cryohet") or c == "rlnRandomSubset"}
    columns.update({k: (np.asarray(v)[pos] if len(v) == len(pset) else np.asarray(v))
                    for k, v in (extra_columns or {}).items()})
    write_cs(path, base, pset.ctf.take(pos), pset.euler_deg[pos], pset.shift_A[pos], pset.apix, columns)


def write_particles_star(path: str | os.PathLike, pset: ParticleSet, extra_columns: dict[str, np.ndarray] | None = None,
                         rows=None, cs: bool = True) -> None:
    """Write particles as a RELION 3.1 STAR (optics + particles), atomically, and with ``cs`` the same particles
    as a cryoSPARC ``.cs`` beside it (same name, suffix ``.cs``; see ``io.cryosparc.write_particles_cs``).

    Every original column and the row order are kept; ``rlnImageName`` points at the original images;
    ``extra_columns`` (arrays of length ``len(pset)``, or of the selected rows) are appended or replace
    columns of the same name; ``rows`` (indices or mask) selects particles. A 3.0 input gets an optics table
    (one group per voltage / Cs / amplitude contrast), its optics columns move there, and pixel origins become
    ``rlnOriginXAngst/YAngst``. A cryoSPARC input gets RELION columns built from the converted values.
    """
    pos = pset._positions(rows)
    extras = {}
    for name, values in (extra_columns or {}).items():
        v = np.asarray(values)
        if v.ndim != 1:
            raise ValueError(f"extra column {name!r} must be 1-D, got shape {v.shape}")
        if len(v) == len(pset):
            v = v[pos]
        elif len(v) != len(pos):
            raise ValueError(f"extra column {name!r} has {len(v)} values; expected {len(pset)} (all particles) "
                             f"or {len(pos)} (the selected rows)")
        extras[name] = v
    if not pset.box > 0:
        raise ValueError("the particle set has no known box size (loaded without images or rlnImageSize)")

    if pset.source_format == "relion3.1":
        df = pset.table.iloc[pos].reset_index(drop=True).copy()
        optics = pset.optics.copy()
    elif pset.source_format == "relion3.0":
        df = pset.table.iloc[pos].reset_index(drop=True).copy()
        optics, group = _optics_from_values(pset, pos)
        df = df.drop(columns=[c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                          "rlnMagnification", "rlnDetectorPixelSize", "rlnImagePixelSize",
                                          "rlnOriginX", "rlnOriginY") if c in df.columns])
        df["rlnOriginXAngst"] = pset.shift_A[pos, 0]
        df["rlnOriginYAngst"] = pset.shift_A[pos, 1]
        df["rlnOpticsGroup"] = group
    else:  # cryoSPARC: RELION columns from the converted values
        optics, group = _optics_from_values(pset, pos)
        cols: dict[str, np.ndarray] = {}
        if np.isfinite(pset.euler_deg[pos]).all():
            cols.update(rlnAngleRot=pset.euler_deg[pos, 0], rlnAngleTilt=pset.euler_deg[pos, 1],
                        rlnAnglePsi=pset.euler_deg[pos, 2], rlnOriginXAngst=pset.shift_A[pos, 0],
                        rlnOriginYAngst=pset.shift_A[pos, 1])
        c = pset.ctf.take(pos)
        cols.update(rlnDefocusU=c.defocus_u_A, rlnDefocusV=c.defocus_v_A, rlnDefocusAngle=c.defocus_angle_deg,
                    rlnPhaseShift=c.phase_shift_deg, rlnCtfBfactor=c.bfactor_A2, rlnCtfScalefactor=c.scale,
                    rlnOpticsGroup=group)
        if "alignments3D/split" in pset.table.columns:
            cols["rlnRandomSubset"] = pset.table["alignments3D/split"].to_numpy()[pos].astype(np.int64) + 1
        df = pd.DataFrame(cols)
    df["rlnImageName"] = _image_name_column(pset, pos)
    for name, v in extras.items():
        df[name] = v
    write_star(path, {"optics": optics, "particles": df})
    if cs:
        write_particles_cs(Path(path).with_suffix(".cs"), pset, extras, pos)
