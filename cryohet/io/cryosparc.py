"""cryoSPARC particle files (``.cs``: a NumPy structured array) read into RELION's terms.

Conversion to RELION (see ``read_cs``):

- pose: ``alignments3D/pose`` is a rotation vector (axis × angle, rad). With ``R = Rotation.from_rotvec(pose)``,
  RELION's matrix is ``A = Rᵀ`` and the Euler angles are RELION's decomposition of ``A``
  (``Euler_matrix2angles``). Why: cryoSPARC's own example code (cryosparc-examples, subparticle-defocus) states
  that "cs poses rotate particles' frames into volume's frame" (``x_vol = R x_img``), while RELION's ``A`` maps
  the volume frame into the image frame (``x_img = A x_vol``, projections sample ``V(Aᵀ x)``), so ``A = R⁻¹ = Rᵀ``.
  The two widely used converters agree: pyem's ``csparc2star`` (``expmap`` returns Rᵀ, then RELION's
  decomposition; checked by its author with ``relion_reconstruct``) and cryoDRGN's ``parse_pose_csparc``
  (expmap, then "Transposing rotation matrix"; its ``R_from_relion`` equals RELION's ``A``).
- shift: ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` with the meaning and sign of RELION's
  origin: pyem and cryoDRGN copy it unchanged, and re-centred re-extraction moves the pick by ``-shift`` for
  cryoSPARC data (helicon's cryoSPARC extractor) as RELION moves it by ``-origin`` (preprocess.cpp,
  ``xcoord -= ROUND(xoff)``). So ``shift_A = shift × alignments3D/psize_A``.
- CTF: ``df1_A`` = rlnDefocusU, ``df2_A`` = rlnDefocusV, ``df_angle_rad`` = rlnDefocusAngle in radians
  (checked on ``empiar_10076_7.cs`` against ``empiar_10076_7.star``, the same 7 particles),
  ``phase_shift_rad`` in radians, ``bfactor`` Å², ``scale``.
- images: ``blob/path`` (relative to the cryoSPARC project; a leading ``>`` is dropped) and ``blob/idx``
  (0-based); ``blob/psize_A`` is the pixel size, ``blob/shape`` the box.

Files are read and written with cryoSPARC's own library (cryosparc-tools' ``Dataset``). ``write_cs`` writes
the inverse conversion (its fields built by ``io.particles.write_particles_cs``): particles read from a ``.cs``
keep their ``uid`` and every original field; particles from a STAR get a ``uid`` derived from their image (path
and index: the same particle gets the same uid in every output) and ``blob/sign`` −1, as cryoSPARC's particle
import gives RELION stacks (``empiar_10076_7.cs``).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.geometry.ctf import CTFParams
from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler

CTF_FIELDS = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
BLOB_FIELDS = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A")


def cs_pose_to_relion(pose_rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (N, 3) rotation vectors -> RELION (rot, tilt, psi) degrees (N, 3)."""
    from scipy.spatial.transform import Rotation  # scipy.spatial: 0.2 s, for .cs files only

    R = Rotation.from_rotvec(np.asarray(pose_rotvec, dtype=np.float64).reshape(-1, 3)).as_matrix()
    return matrix_to_euler(np.transpose(R, (0, 2, 1)))


def relion_to_cs_pose(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) degrees (N, 3) -> cryoSPARC ``alignments3D/pose`` rotation vectors (N, 3): the
    inverse of :func:`cs_pose_to_relion` (R = Aᵀ)."""
    from scipy.spatial.transform import Rotation

    A = euler_to_matrix(np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3))
    return Rotation.from_matrix(np.transpose(A, (0, 2, 1))).as_rotvec()


def _load(path: Path) -> np.ndarray:
    from cryosparc.dataset import Dataset

    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a regular file")
    try:
        data = Dataset.load(path).to_records(fixed=True)
    except Exception as e:  # e.g. a structured array with padding that another tool saved: NumPy reads it
        try:
            data = np.load(path, allow_pickle=False)
        except Exception:
            raise InputError(path, f"not a cryoSPARC .cs file: neither cryosparc-tools nor NumPy can read it "
                                   f"({e})") from e
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(path, "not a cryoSPARC .cs file: expected a 1-D NumPy structured array")
    return data


def _single_value(path: Path, values: np.ndarray, what: str, rel_tol: float = 1e-3) -> float:
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise InputError(path, f"{what} holds NaN or infinite values")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo > rel_tol * max(abs(hi), 1e-12):
        raise InputError(path, f"particles have different {what} ({lo:g} to {hi:g}); cryohet needs one value")
    return float(np.median(v))


def read_cs(path: str | os.PathLike, require_poses: bool = True) -> dict[str, np.ndarray]:
    """Read a cryoSPARC particles ``.cs`` file into RELION terms (see the module docstring for the conversion).

    Returns arrays of length N: ``euler_deg`` (N, 3), ``shift_A`` (N, 2), ``defocus_u_A``, ``defocus_v_A``,
    ``defocus_angle_deg``, ``voltage_kV``, ``cs_mm``, ``amp_contrast``, ``phase_shift_deg``, ``bfactor_A2``,
    ``scale``, ``blob_path`` (str), ``blob_idx`` (0-based), ``blob_sign``, ``uid``, ``split``; and ``apix``,
    ``box``, ``has_poses`` (0-d arrays) and ``records`` (the original structured array).
    Files without ``alignments3D/pose`` are refused unless ``require_poses=False`` (poses are then NaN).
    """
    path = Path(path)
    cs = _load(path)
    names = set(cs.dtype.names)
    n = len(cs)
    if n == 0:
        raise InputError(path, "holds no particles")
    missing_blob = [f for f in BLOB_FIELDS if f not in names]
    if missing_blob:
        raise InputError(path, f"no particle images: missing field(s) {', '.join(missing_blob)}")
    missing_ctf = [f for f in CTF_FIELDS if f not in names]
    if missing_ctf:
        raise InputError(path, f"no CTF parameters: missing field(s) {', '.join(missing_ctf)}")
    has_poses = "alignments3D/pose" in names and "alignments3D/shift" in names
    if not has_poses and require_poses:
        if any(f.startswith("alignments2D/") for f in names):
            raise InputError(path, "has no 3-D poses (no alignments3D/pose): it holds only 2-D classification "
                                   "alignments (alignments2D); use the particles of a 3-D refinement job")
        raise InputError(path, "has no 3-D poses (no alignments3D/pose); use the particles of a 3-D refinement job")

    shape = np.asarray(cs["blob/shape"]).reshape(n, -1)
    if shape.shape[1] != 2:
        raise InputError(path, f"blob/shape has {shape.shape[1]} values per particle, expected 2 (y, x)")
    if (shape[:, 0] != shape[:, 1]).any():
        bad = int(np.flatnonzero(shape[:, 0] != shape[:, 1])[0])
        raise InputError(path, f"images are not square: particle {bad} has blob/shape {shape[bad].tolist()}")
    if (shape[:, 0] != shape[0, 0]).any():
        raise InputError(path, f"stacks of different box sizes: {sorted(set(shape[:, 0].tolist()))} px")
    apix = _single_value(path, cs["blob/psize_A"], "pixel sizes (blob/psize_A)")
    if cs["blob/psize_A"].dtype == np.float32:
        apix = float(str(np.float32(apix)))  # 2.95, not 2.950000047683716 (the float32 it was stored as)

    out: dict[str, np.ndarray] = {}
    if has_poses:
        pose = np.asarray(cs["alignments3D/pose"], dtype=np.float64).reshape(n, 3)
        shift_px = np.asarray(cs["alignments3D/shift"], dtype=np.float64).reshape(n, 2)
        if not (np.isfinite(pose).all() and np.isfinite(shift_px).all()):
            raise InputError(path, "alignments3D/pose or alignments3D/shift holds NaN or infinite values")
        psize = (np.asarray(cs["alignments3D/psize_A"], dtype=np.float64) if "alignments3D/psize_A" in names
                 else np.full(n, apix))
        out["euler_deg"] = cs_pose_to_relion(pose)
        out["shift_A"] = shift_px * psize[:, None]
    else:
        out["euler_deg"] = np.full((n, 3), np.nan)
        out["shift_A"] = np.zeros((n, 2))

    def field(name: str, default: float) -> np.ndarray:
        return np.asarray(cs[name], dtype=np.float64) if name in names else np.full(n, default)

    out["defocus_u_A"] = field("ctf/df1_A", 0.0)
    out["defocus_v_A"] = field("ctf/df2_A", 0.0)
    out["defocus_angle_deg"] = np.rad2deg(field("ctf/df_angle_rad", 0.0))
    out["voltage_kV"] = field("ctf/accel_kv", 0.0)
    out["cs_mm"] = field("ctf/cs_mm", 0.0)
    out["amp_contrast"] = field("ctf/amp_contrast", 0.0)
    out["phase_shift_deg"] = np.rad2deg(field("ctf/phase_shift_rad", 0.0))
    out["bfactor_A2"] = field("ctf/bfactor", 0.0)
    out["scale"] = field("ctf/scale", 1.0)
    for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amp_contrast"):
        if not np.isfinite(out[k]).all():
            raise InputError(path, f"CTF field for {k} holds NaN or infinite values")
    raw_paths = np.asarray(cs["blob/path"])
    out["blob_path"] = np.array([(p.decode() if isinstance(p, bytes) else str(p)).lstrip(">") for p in raw_paths],
                                dtype=object)
    out["blob_idx"] = np.asarray(cs["blob/idx"], dtype=np.int64)
    out["blob_sign"] = field("blob/sign", 1.0)
    out["uid"] = np.asarray(cs["uid"]) if "uid" in names else np.arange(n, dtype=np.uint64)
    out["split"] = (np.asarray(cs["alignments3D/split"], dtype=np.int64) if "alignments3D/split" in names
                    else np.full(n, -1, dtype=np.int64))
    out["apix"] = np.asarray(apix)
    out["box"] = np.asarray(int(shape[0, 0]))
    out["has_poses"] = np.asarray(has_poses)
    out["records"] = cs
    return out


#: cryohet's STAR columns that hold latent coordinates (cryohetZ1..d), written as 3D Variability's fields.
_LATENT_COLUMN = re.compile(r"^cryohetZ(\d+)$")


def uid_from_image(names: np.ndarray, index0: np.ndarray) -> np.ndarray:
    """A 64-bit uid per particle from its image (stack path as written, 0-based index)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{i}@{p}".encode(), digest_size=8).digest(), "little")
                     for p, i in zip(names, index0)], dtype=np.uint64)


def join_fields(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The fields of a .cs from its table as ``read_cs``'s records flatten it (``name/j`` columns of a
    multi-valued field joined again)."""
    fields: dict[str, np.ndarray] = {}
    multi: dict[str, list[str]] = {}
    for name in table.columns:
        m = re.match(r"^(.*)/(\d+)$", name)
        if m:
            multi.setdefault(m.group(1), []).append(name)
        else:
            fields[name] = table[name].to_numpy()
    for base, cols in multi.items():
        fields[base] = np.stack([table[c].to_numpy() for c in sorted(cols, key=lambda c: int(c.rsplit("/", 1)[1]))],
                                axis=1)
    return fields


def write_cs(path: str | os.PathLike, base: dict[str, np.ndarray], ctf: CTFParams, euler_deg: np.ndarray,
             shift_A: np.ndarray, apix: float, columns: dict[str, np.ndarray]) -> None:
    """Write particles as a cryoSPARC ``.cs`` file (cryosparc-tools ``Dataset``), atomically.

    ``base``: ``uid`` and ``blob/*`` fields (and any other field kept from a ``.cs``). Added: the CTF (``ctf/*``),
    the poses when all are known (``alignments3D/pose`` by the inverse of :func:`cs_pose_to_relion`, ``shift`` in
    pixels, ``psize_A``), and ``columns`` (1-D numeric, one value per particle) as ``cryohet/<name>`` fields;
    ``cryohetZk`` also as ``components_mode_<k-1>/value``, where cryoSPARC's 3D Variability writes its
    per-particle coordinates, and ``rlnRandomSubset`` as ``alignments3D/split``.
    """
    from cryosparc.dataset import Dataset

    fields = dict(base)
    n = len(fields["uid"])
    fields.update({"ctf/accel_kv": ctf.voltage_kV, "ctf/cs_mm": ctf.cs_mm, "ctf/amp_contrast": ctf.amp_contrast,
                   "ctf/df1_A": ctf.defocus_u_A, "ctf/df2_A": ctf.defocus_v_A,
                   "ctf/df_angle_rad": np.deg2rad(ctf.defocus_angle_deg),
                   "ctf/phase_shift_rad": np.deg2rad(ctf.phase_shift_deg), "ctf/bfactor": ctf.bfactor_A2,
                   "ctf/scale": ctf.scale})
    if np.isfinite(euler_deg).all():
        fields.update({"alignments3D/pose": relion_to_cs_pose(euler_deg).astype(np.float32),
                       "alignments3D/shift": (np.asarray(shift_A) / apix).astype(np.float32),
                       "alignments3D/psize_A": np.full(n, apix, dtype=np.float32)})
    for name, v in columns.items():
        v = np.asarray(v)
        if v.ndim != 1 or len(v) != n:
            raise ValueError(f"extra column {name!r}: {v.shape} values for {n} particles")
        if not np.issubdtype(v.dtype, np.number):
            continue
        if name == "rlnRandomSubset":
            fields["alignments3D/split"] = v.astype(np.uint32) - 1
        m = _LATENT_COLUMN.match(name)
        if m:
            fields[f"components_mode_{int(m.group(1)) - 1}/value"] = v.astype(np.float32)
        fields[f"cryohet/{name.removeprefix('cryohet')}"] = v.astype(np.float64)
    data = Dataset({k: np.asarray(v) for k, v in fields.items()})
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        data.save(fh)
