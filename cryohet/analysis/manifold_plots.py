"""Figures of the manifold methods: an image manifold (free energy along the coordinate, the projection directions
with the sense each was given, how well neighbouring directions agree with those senses) and a volume manifold (the
volumes' embedding by state, the particles' coordinates and their votes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.landscape import Landscape
from cryohet.analysis.plots import save_png
from cryohet.analysis.volume_manifold import Votes


def plot_image_manifold(path: str | Path, man: Any, fit: Landscape, cap_kT: float = 8.0) -> Path:
    """``man``: an ``ImageManifold`` (bins, signs, W); ``fit``: the 1-D landscape of its coordinate."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax = fig.add_subplot(1, 3, 1)
    x = fit.grid.axes[0]
    ax.plot(x, fit.G, color="k")
    ax.fill_between(x, fit.G - fit.G_std, fit.G + fit.G_std, color="0.8")
    ax.set_ylim(0, cap_kT)
    ax.set_xlabel("position along the motion s")
    ax.set_ylabel("free energy (kT)")

    ax = fig.add_subplot(1, 3, 2)
    d = man.bins.directions
    counts = np.bincount(man.bins.label, minlength=len(d))
    lon = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    lat = np.degrees(np.arcsin(np.clip(d[:, 2], -1, 1)))
    for sign, colour, name in ((1, "tab:blue", "sense +"), (-1, "tab:orange", "sense −")):
        sel = man.signs == sign
        ax.scatter(lon[sel], lat[sel], s=10 + 90 * counts[sel] / counts.max(), c=colour, label=name, alpha=0.8)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xlabel("direction longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{len(d)} directions (size: particles)", fontsize=9)

    ax = fig.add_subplot(1, 3, 3)
    iu = np.triu_indices(len(d), 1)
    w = (man.W * np.outer(man.signs, man.signs))[iu]
    w = w[man.W[iu] != 0]
    ax.hist(w, bins=30, range=(-1, 1), color="0.4")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("neighbours' signature correlation, after the senses")
    ax.set_ylabel("direction pairs")
    ax.set_title(f"agreement {100 * man.agreement:.0f} %", fontsize=9)
    return save_png(fig, path, dpi=110)


def plot_volume_manifold(path: str | Path, coords: np.ndarray, counts: np.ndarray, state: np.ndarray,
                         particle_coords: np.ndarray, votes: Votes, method: str) -> Path:
    """Left: the volumes in their embedding, coloured by state, marker area by members; middle: the particles'
    mean coordinates coloured by their voted state; right: the fraction of each particle's votes for its state."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 3, 1)
    xy = coords if coords.shape[1] > 1 else np.column_stack([coords[:, 0], np.zeros(len(coords))])
    n_states = int(state.max()) + 1
    for s in range(n_states):
        sel = state == s
        ax.scatter(xy[sel, 0], xy[sel, 1], s=15 + 150 * counts[sel] / max(counts.max(), 1), color=f"C{s % 10}",
                   alpha=0.75, edgecolor="k", lw=0.4, label=f"state {s}")
    ax.set_xlabel(f"{method} coordinate 1")
    ax.set_ylabel(f"{method} coordinate 2" if coords.shape[1] > 1 else "")
    ax.set_title(f"{len(coords)} volumes (size: members)", fontsize=9)
    ax.legend(fontsize=7)

    ax = fig.add_subplot(1, 3, 2)
    ok = votes.state >= 0
    pxy = particle_coords if particle_coords.shape[1] > 1 else np.column_stack(
        [particle_coords[:, 0], np.random.default_rng(0).normal(0, 0.02, len(particle_coords))])
    sub = np.flatnonzero(ok)
    if len(sub) > 20000:
        sub = np.sort(np.random.default_rng(0).choice(sub, 20000, replace=False))
    ax.scatter(pxy[sub, 0], pxy[sub, 1], s=3, c=[f"C{s % 10}" for s in votes.state[sub]], alpha=0.4, lw=0)
    ax.set_xlabel("particle coordinate 1 (mean over its volumes)")
    ax.set_ylabel("particle coordinate 2" if particle_coords.shape[1] > 1 else "(jittered)")
    ax.set_title(f"{int(ok.sum())} particles by voted state", fontsize=9)

    ax = fig.add_subplot(1, 3, 3)
    ax.hist(votes.fraction[ok], bins=20, range=(0, 1), color="0.4")
    ax.set_xlabel("fraction of its votes for its state")
    ax.set_ylabel("particles")
    ax.set_title(f"median {np.median(votes.fraction[ok]) if ok.any() else 0:.2f}", fontsize=9)
    return save_png(fig, path, dpi=100)
