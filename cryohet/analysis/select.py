"""Particle subsets from latent-space criteria: clusters, a region (box or ellipse), an index list.

A region is written as comma-separated terms ``<axis>:<low>:<high>``, e.g. ``"pc1:-1:1,pc2:0:2"``:
``pcN`` is the N-th principal-component coordinate, ``zN`` the N-th latent coordinate, ``umapN`` the
N-th UMAP coordinate (N counts from 1). Bounds are in the units of that axis; an empty bound is open
(``"z1::0.5"``: z1 <= 0.5; box only). Shape ``box``: every term holds (bounds inclusive). Shape
``ellipse``: the axis-aligned ellipse(oid) inscribed in that box, Σ((x − centre)/half-width)² <= 1.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryohet.errors import InputError

#: Region axis prefixes and what they refer to.
REGION_SPACES = {"pc": "principal-component coordinate", "z": "latent coordinate", "umap": "UMAP coordinate"}
REGION_SHAPES = ("box", "ellipse")

_TERM = re.compile(r"^(pc|z|umap)(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class AxisRange:
    """One region term: ``space`` ("pc", "z" or "umap"), 0-based ``axis``, inclusive bounds."""

    space: str
    axis: int
    low: float
    high: float

    def __str__(self) -> str:
        lo = "" if np.isneginf(self.low) else f"{self.low:g}"
        hi = "" if np.isposinf(self.high) else f"{self.high:g}"
        return f"{self.space}{self.axis + 1}:{lo}:{hi}"


def parse_region(text: str, flag: str = "--region") -> list[AxisRange]:
    """Parse ``"pc1:-1:1,pc2:0:2"`` into AxisRange terms; raise ValueError naming ``flag``."""
    terms = []
    seen = set()
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        parts = [p.strip() for p in raw.split(":")]
        if len(parts) != 3:
            raise ValueError(f"{flag}: term {raw!r} is not <axis>:<low>:<high> (e.g. pc1:-1:1)")
        m = _TERM.match(parts[0])
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"{flag}: axis {parts[0]!r} in {raw!r} is not pcN, zN or umapN with N >= 1")
        space, axis = m.group(1).lower(), int(m.group(2)) - 1
        try:
            low = float(parts[1]) if parts[1] else -np.inf
            high = float(parts[2]) if parts[2] else np.inf
        except ValueError:
            raise ValueError(f"{flag}: bounds in {raw!r} are not numbers") from None
        if np.isnan(low) or np.isnan(high) or low > high:
            raise ValueError(f"{flag}: in {raw!r} the low bound must not exceed the high bound")
        if (space, axis) in seen:
            raise ValueError(f"{flag}: axis {parts[0]} appears twice")
        seen.add((space, axis))
        terms.append(AxisRange(space, axis, low, high))
    if not terms:
        raise ValueError(f"{flag}: empty region")
    return terms


def region_mask(terms: list[AxisRange], spaces: Mapping[str, np.ndarray], shape: str = "box",
                flag: str = "--region") -> np.ndarray:
    """Boolean mask (N,) of the particles inside the region.

    ``spaces`` maps "pc", "z", "umap" to per-particle coordinates (N, k); a term whose space is
    absent or whose axis does not exist raises ValueError.
    """
    if shape not in REGION_SHAPES:
        raise ValueError(f"region shape must be one of {', '.join(REGION_SHAPES)}, got {shape!r}")
    cols, lows, highs = [], [], []
    for t in terms:
        coords = spaces.get(t.space)
        if coords is None:
            raise ValueError(f"{flag}: {t} needs {REGION_SPACES[t.space]}s, which are not available"
                             + (" (give an analyze run with --analysis)" if t.space == "umap" else ""))
        coords = np.asarray(coords)
        coords = coords[:, None] if coords.ndim == 1 else coords
        if t.axis >= coords.shape[1]:
            raise ValueError(f"{flag}: {t.space}{t.axis + 1} does not exist: there are {coords.shape[1]} "
                             f"{REGION_SPACES[t.space]}(s)")
        cols.append(coords[:, t.axis].astype(np.float64))
        lows.append(t.low)
        highs.append(t.high)
    x = np.stack(cols, axis=1)
    lo, hi = np.array(lows), np.array(highs)
    if shape == "box":
        return np.all((x >= lo) & (x <= hi), axis=1)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"{flag}: an ellipse needs both bounds on every axis")
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(half > 0, (x - centre) / np.where(half > 0, half, 1.0), np.where(x == centre, 0.0, np.inf))
    return (u ** 2).sum(axis=1) <= 1.0


def parse_clusters(text: str, n_clusters: int, flag: str = "--clusters") -> list[int]:
    """Cluster numbers from ``"0,3"`` (0-based, as in labels.npy); each must be in 0..n_clusters-1."""
    out = []
    for v in (s.strip() for s in re.split(r"[,\s]+", text)):
        if not v:
            continue
        try:
            c = int(v)
        except ValueError:
            raise ValueError(f"{flag}: {v!r} is not a cluster number") from None
        if not 0 <= c < n_clusters:
            raise ValueError(f"{flag}: cluster {c} does not exist (clusters are 0..{n_clusters - 1})")
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError(f"{flag}: no cluster given")
    return out


def cluster_mask(labels: np.ndarray, clusters: list[int]) -> np.ndarray:
    """Boolean mask (N,) of the particles whose label is one of ``clusters``."""
    return np.isin(np.asarray(labels), np.asarray(clusters))


def read_indices(path: str | Path, n: int) -> np.ndarray:
    """0-based row indices from ``.npy`` (integers or a boolean mask of length n) or text (integers
    separated by spaces, commas or new lines; ``#`` comments). Returns sorted unique int64 indices;
    raises InputError naming the file for non-integers or indices outside 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "index file not found")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False).ravel()
        else:
            text = re.sub(r"#.*", "", path.read_text())
            arr = np.array([float(v) for v in re.split(r"[,\s]+", text) if v])
    except (ValueError, OSError) as exc:
        raise InputError(path, f"cannot read row indices ({exc})") from None
    if arr.dtype == bool:
        if arr.size != n:
            raise InputError(path, f"a boolean mask must have one value per particle ({n}), got {arr.size}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        raise InputError(path, "no row index in the file")
    if not np.issubdtype(arr.dtype, np.number) or np.any(arr != np.round(arr)):
        raise InputError(path, "row indices must be integers (0-based)")
    idx = arr.astype(np.int64)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise InputError(path, f"row index {int(bad[0])} is out of range: there are {n} particles (0..{n - 1}, "
                               f"0-based); {bad.size} index(es) out of range")
    return np.unique(idx)


def indices_mask(indices: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask
