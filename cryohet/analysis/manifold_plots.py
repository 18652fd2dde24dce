"""Figure of an image manifold: free energy along the coordinate, the projection directions with the sense each was
given, and how well neighbouring directions agree with those senses."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.landscape import Landscape
from cryohet.analysis.plots import save_png


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
