"""Flexibility analysis of rigid bodies (as ``relion_flex_analyse``): PCA of the per-particle body motions.

Each particle has 6 numbers per body (``cryohet.inference.multibody.body_motions``): the body's rotation relative
to the consensus as Euler angles in the body's frame (degrees, no motion is 0, 90, 0) and its translation (Å).
As RELION, every column is scaled by how much the body's masked map changes for a unit step of it (the norm of
the map difference for 1° of rot, of tilt, of psi, and for a 1 Å shift), so that the PCA weighs the motions by
their effect on the density rather than by their units. The principal components are sorted by the variance they
explain (ratios summing to 1).

Optionally (``relative_to``) the motions are first re-expressed relative to one body, so that what all bodies
share, the errors of the consensus poses, drops out before the PCA and only their relative motion remains; RELION
analyses the motions relative to the consensus.

Maps along a component are made as RELION makes them: the particles are sorted along the component and cut into
equally populated bins; at each bin's mean value the motions are rebuilt, every body's map and mask are moved
rigidly (r → R (r − c) + c + t) and the bodies are combined as Σ mask·map / max(Σ mask, 1). Where the masks of
two bodies overlap their densities are averaged, never added, and a body's soft edge is not boosted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from cryohet.analysis import latent
from cryohet.analysis.plots import save_png
from cryohet.inference.bodies import relative_euler, relative_rotation

#: Euler angles of "no motion" in a body's frame (see cryohet.inference.bodies).
REST_EULER = np.array([0.0, 90.0, 0.0])
COLUMN_NAMES = ("rot", "tilt", "psi", "x", "y", "z")


def repose(volume: np.ndarray, R: np.ndarray, t_A: np.ndarray, centre_A: np.ndarray, apix: float,
           order: int = 1) -> np.ndarray:
    """``volume`` (z, y, x) with its content moved rigidly: the point r goes to R (r − c) + c + t (Å, x y z from
    the box centre); zero where nothing comes from inside the box. ``order``: spline order of the interpolation."""
    box = volume.shape[-1]
    flip = np.eye(3)[::-1]                                   # (x, y, z) <-> (z, y, x)
    Rt = np.asarray(R, dtype=np.float64).T
    matrix = flip @ Rt @ flip
    ctr = np.full(3, box // 2, dtype=np.float64)
    c_px = np.asarray(centre_A, dtype=np.float64) / apix
    t_px = np.asarray(t_A, dtype=np.float64) / apix
    # input(zyx) = M (out − ctr) − flip Rᵀ (c + t) + flip c + ctr
    offset = ctr - matrix @ ctr - flip @ (Rt @ (c_px + t_px)) + flip @ c_px
    return ndimage.affine_transform(np.asarray(volume, dtype=np.float32), matrix, offset, order=order,
                                    mode="grid-constant", cval=0.0).astype(np.float32)


def motion_transform(motion: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, t_A) of one body from its 6 numbers (rot, tilt, psi in its frame; x, y, z in Å)."""
    return relative_rotation(np.asarray(motion[:3], dtype=np.float64), frame), np.asarray(motion[3:], np.float64)


def column_scales(maps: np.ndarray, masks: np.ndarray, centres_A: np.ndarray, frames: np.ndarray,
                  apix: float) -> np.ndarray:
    """(6 B,): RELION's PCA column weights, the norm of the change of each body's masked map for 1° of rot, tilt
    and psi and for a 1 Å shift along x (used for x, y and z)."""
    out = []
    for vol, mask, c, frame in zip(maps, masks, centres_A, frames):
        body = np.asarray(vol, np.float32) * np.asarray(mask, np.float32)
        norms = []
        for step in np.eye(3):
            R = relative_rotation(REST_EULER + step, frame)
            norms.append(np.linalg.norm(repose(body, R, np.zeros(3), c, apix) - body))
        shifted = repose(body, np.eye(3), np.array([apix, 0.0, 0.0]), c, apix)
        per_A = np.linalg.norm(shifted - body) / apix
        out += norms + [per_A] * 3
    scales = np.asarray(out, dtype=np.float64)
    if not (scales > 0).all():
        raise ValueError("a body's masked map does not change when it moves (an empty body map?)")
    return scales


def relative_motions(motions: np.ndarray, centres_A: np.ndarray, frames: np.ndarray, anchor: int) -> np.ndarray:
    """Motions (N, 6 B) re-expressed relative to body ``anchor`` (0-based): each body's rigid motion composed with
    the inverse of the anchor's, so that the anchor is at rest and a motion the bodies share (an error of the
    consensus pose) drops out. Body b moves r → R_b (r − c_b) + c_b + t_b; relative to the anchor a it moves by
    R_aᵀ R_b about c_b and t = R_aᵀ (c_b + t_b − c_a − t_a) + c_a − c_b."""
    m = np.asarray(motions, dtype=np.float64)
    out = m.copy()
    Ra = relative_rotation(m[:, 6 * anchor:6 * anchor + 3], frames[anchor])
    ta, ca = m[:, 6 * anchor + 3:6 * anchor + 6], centres_A[anchor]
    for b, (cb, frame) in enumerate(zip(centres_A, frames)):
        Rb = relative_rotation(m[:, 6 * b:6 * b + 3], frame)
        out[:, 6 * b:6 * b + 3] = relative_euler(np.swapaxes(Ra, 1, 2) @ Rb, frame)
        out[:, 6 * b + 3:6 * b + 6] = np.einsum("nji,nj->ni", Ra, cb + m[:, 6 * b + 3:6 * b + 6] - ca - ta) + ca - cb
    return out


@dataclass
class FlexPCA:
    """PCA of the scaled body motions. ``projections`` (N, D) are the particles' coordinates on the components."""

    scales: np.ndarray                   # (D,) column weights (see column_scales)
    pca: latent.PCAResult                # of the scaled motions
    projections: np.ndarray              # (N, D)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.pca.explained_variance_ratio

    def components_for(self, variance: float) -> int:
        """The number of components that explain at least the fraction ``variance`` (RELION's --v)."""
        cum = np.cumsum(self.explained_variance_ratio)
        return int(min(len(cum), np.searchsorted(cum, variance - 1e-12) + 1))

    def motions_at(self, component: int, values: np.ndarray) -> np.ndarray:
        """Unscaled motions (M, D) at coordinates ``values`` (M,) along ``component`` (0-based), 0 on the others."""
        v = np.asarray(values, dtype=np.float64)
        return (self.pca.mean + v[:, None] * self.pca.components[component]) / self.scales


def flex_pca(motions: np.ndarray, scales: np.ndarray) -> FlexPCA:
    """PCA of motions (N, 6 B) after multiplying each column by ``scales``."""
    z = np.asarray(motions, dtype=np.float64) * scales
    result = latent.pca(z)
    return FlexPCA(np.asarray(scales, np.float64), result, result.transform(z))


def bin_means(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Mean of each of ``n_bins`` equally populated bins of the sorted ``values`` (RELION's movie frames)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return np.array([chunk.mean() for chunk in np.array_split(v, n_bins) if len(chunk)])


def combine_bodies(maps: np.ndarray, masks: np.ndarray, centres_A: np.ndarray, frames: np.ndarray,
                   motion: np.ndarray, apix: float) -> np.ndarray:
    """One map with every body moved by ``motion`` (6 B,): Σ_b mask_b'·map_b' / max(Σ_b mask_b', 1)."""
    num = np.zeros(maps.shape[1:], dtype=np.float64)
    den = np.zeros_like(num)
    for b, (vol, mask, c, frame) in enumerate(zip(maps, masks, centres_A, frames)):
        R, t = motion_transform(motion[6 * b:6 * b + 6], frame)
        m = np.clip(repose(mask, R, t, c, apix, order=1), 0.0, 1.0)
        num += m * repose(vol, R, t, c, apix, order=3)
        den += m
    return (num / np.maximum(den, 1.0)).astype(np.float32)


def select_rows(projections: np.ndarray, component: int, low: float | None, high: float | None) -> np.ndarray:
    """0-based rows whose coordinate on ``component`` (1-based) lies in [low, high] (None: open)."""
    if not 1 <= component <= projections.shape[1]:
        raise ValueError(f"component {component} does not exist: there are {projections.shape[1]} (1..)")
    v = projections[:, component - 1]
    keep = np.ones(len(v), dtype=bool)
    if low is not None:
        keep &= v >= low
    if high is not None:
        keep &= v <= high
    return np.flatnonzero(keep)


def variance_plot(path: Path, ratio: np.ndarray) -> Path:
    """Bar chart of the variance each component explains, with the cumulative sum."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, 100 * ratio, color="#3b6ea5")
    ax.plot(k, 100 * np.cumsum(ratio), "o-", color="black", ms=3, lw=1, label="cumulative")
    ax.set(xlabel="principal component", ylabel="variance explained (%)", ylim=(0, 105))
    ax.legend(fontsize=8)
    return save_png(fig, path, dpi=100)
