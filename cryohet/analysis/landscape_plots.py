"""Figures of a free-energy landscape: the landscape with its minima and path, and G along the path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.landscape import Grid
from cryohet.analysis.plots import save_png


def plot_landscape(path: str | Path, grid: Grid, G: np.ndarray, G_std: np.ndarray, minima: np.ndarray,
                   route: np.ndarray | None, labels: list[str], cap_kT: float = 8.0) -> Path:
    """1-D: G with its ±1 s.d. band; 2-D and more: G over the first two axes (the minimum over the others),
    filled contours up to ``cap_kT``; minima numbered, the path drawn."""
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.add_subplot()
    if G.ndim == 1:
        x = grid.axes[0]
        ax.plot(x, G, color="k")
        ax.fill_between(x, G - G_std, G + G_std, color="0.8")
        ax.set_ylim(0, cap_kT)
        ax.set_ylabel("free energy (kT)")
        for i, m in enumerate(minima):
            ax.annotate(str(i), (x[m], G[m]), textcoords="offset points", xytext=(0, 6), ha="center")
        if route is not None:
            ax.axvspan(route[:, 0].min(), route[:, 0].max(), color="tab:orange", alpha=0.15, label="path")
            ax.legend()
    else:
        g2 = G.min(axis=tuple(range(2, G.ndim))) if G.ndim > 2 else G
        x, y = grid.axes[0], grid.axes[1]
        cs = ax.contourf(x, y, np.minimum(g2, cap_kT).T, levels=np.linspace(0, cap_kT, 17), cmap="viridis")
        fig.colorbar(cs, ax=ax, label="free energy (kT)")
        pts = grid.points()[minima]
        ax.scatter(pts[:, 0], pts[:, 1], c="w", edgecolors="k", zorder=3)
        for i, p in enumerate(pts):
            ax.annotate(str(i), (p[0], p[1]), color="w", textcoords="offset points", xytext=(4, 4))
        if route is not None:
            ax.plot(route[:, 0], route[:, 1], color="tab:red", lw=2, label="minimum free-energy path")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel(labels[1])
    ax.set_xlabel(labels[0])
    return save_png(fig, path, dpi=110)


def plot_path_profile(path: str | Path, arc: np.ndarray, G: np.ndarray, G_std: np.ndarray) -> Path:
    """G (± 1 s.d.) along the path against its arc length."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(arc, G, "o-", color="k", ms=3)
    ax.fill_between(arc, G - G_std, G + G_std, color="0.8")
    ax.set_xlabel("arc length along the path (latent units)")
    ax.set_ylabel("free energy (kT)")
    return save_png(fig, path, dpi=110)
