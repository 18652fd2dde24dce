"""Free energy along a collective variable from frame populations: G = −kT ln p, binned, with a credible band.

p(bin) is the summed population of the frames whose CV falls in the bin (one bin per frame for the frame number).
The band is the 2.5-97.5 % range of G over posterior samples of the populations. Every curve (estimate and band)
is shifted by one constant, the minimum of the estimate, so the band shows the absolute uncertainty of each bin.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.plots import save_png
from cryohet.atomic import atomic_path

#: Boltzmann constant, kcal/(mol·K)
K_B_KCAL = 0.0019872041
#: populations below this are taken as this (G stays finite)
P_FLOOR = 1e-12


@dataclass
class Profile:
    centre: np.ndarray       # (B,) CV value of each bin's centre (the frame's value for one bin per frame)
    n_frames: np.ndarray     # (B,) frames in the bin
    population: np.ndarray   # (B,) estimate
    G_kT: np.ndarray         # (B,) −ln p, minimum 0
    G_lo_kT: np.ndarray      # (B,) 2.5 % over the samples
    G_hi_kT: np.ndarray      # (B,) 97.5 %


def bin_frames(cv: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of each frame (F,) and bin centres: ``n_bins`` equal bins over the CV's range, only those holding
    frames kept; ``n_bins`` 0 gives one bin per distinct CV value."""
    cv = np.asarray(cv, dtype=np.float64)
    if n_bins <= 0 or np.ptp(cv) == 0:
        centres, index = np.unique(cv, return_inverse=True)
        return index, centres
    edges = np.linspace(cv.min(), cv.max(), n_bins + 1)
    raw = np.clip(np.digitize(cv, edges[1:-1]), 0, n_bins - 1)
    used, index = np.unique(raw, return_inverse=True)
    return index, 0.5 * (edges[used] + edges[used + 1])


def free_energy_profile(cv: np.ndarray, weights: np.ndarray, samples: np.ndarray, n_bins: int = 0) -> Profile:
    """The binned free energy of frames with CV values ``cv`` (F,), populations ``weights`` (F,) and posterior
    samples ``samples`` (S, F)."""
    index, centres = bin_frames(cv, n_bins)
    B = len(centres)

    def binned(w: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(index, weights=row, minlength=B) for row in np.atleast_2d(w)])

    p = binned(weights)[0]
    G = -np.log(np.clip(p, P_FLOOR, None))
    Gs = -np.log(np.clip(binned(samples), P_FLOOR, None))
    shift = G.min()
    lo, hi = np.percentile(Gs, [2.5, 97.5], axis=0)
    return Profile(centres, np.bincount(index, minlength=B), p, G - shift, lo - shift, hi - shift)


def write_profile_csv(path: str | Path, prof: Profile, cv_name: str, temperature_K: float) -> Path:
    """CSV: cv, frames, population, G in kT and kcal/mol (at ``temperature_K``) with its 2.5/97.5 % band."""
    path = Path(path)
    kcal = K_B_KCAL * temperature_K
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([cv_name, "n_frames", "population", "G_kT", "G_2.5_kT", "G_97.5_kT", "G_kcal_mol",
                    "G_2.5_kcal_mol", "G_97.5_kcal_mol"])
        for i in range(len(prof.centre)):
            w.writerow([f"{prof.centre[i]:.6g}", int(prof.n_frames[i]), f"{prof.population[i]:.6g}",
                        *(f"{v:.5g}" for v in (prof.G_kT[i], prof.G_lo_kT[i], prof.G_hi_kT[i])),
                        *(f"{v * kcal:.5g}" for v in (prof.G_kT[i], prof.G_lo_kT[i], prof.G_hi_kT[i]))])
    return path


def plot_profile(path: str | Path, prof: Profile, cv_name: str, frame_cv: np.ndarray, weights: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray) -> Path:
    """Two panels: the frames' populations with their 95 % credible intervals against their CV, and the free
    energy along the CV with its band."""
    fig = Figure(figsize=(6.4, 6.4))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.errorbar(frame_cv, weights, yerr=[np.clip(weights - lo, 0, None), np.clip(hi - weights, 0, None)],
                 fmt="o", ms=3, capsize=2)
    ax1.set_ylabel("population")
    ax1.set_title("frame populations (95 % credible intervals)")
    ax2.fill_between(prof.centre, prof.G_lo_kT, prof.G_hi_kT, alpha=0.3, label="95 % band")
    ax2.plot(prof.centre, prof.G_kT, "o-", ms=3, label="−ln p")
    ax2.set_xlabel(cv_name)
    ax2.set_ylabel("free energy (kT)")
    ax2.legend()
    return save_png(fig, path)
