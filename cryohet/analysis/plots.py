"""Latent-space figures as PNG: scatter (optionally coloured by cluster, with centres), density, histogram.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryohet.atomic import atomic_path

#: At most this many points are drawn in a scatter plot (a random subset beyond it).
MAX_SCATTER_POINTS = 100_000


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` with the Agg canvas and write it as PNG (atomically: nothing half-written)."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _subset(n: int, seed: int = 0) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_SCATTER_POINTS, replace=False))


def scatter_plot(xy: np.ndarray, path: str | Path, labels: np.ndarray | None = None,
                 centers: np.ndarray | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
                 points: np.ndarray | None = None, points_label: str = "") -> Path:
    """Scatter of 2-D coordinates ``xy`` (N, 2) coloured by ``labels`` (N,) when given; ``centers``
    (K, 2) are drawn and numbered 0..K-1; ``points`` (M, 2) are drawn as a connected path (e.g. a PC
    traversal). 1-D coordinates (N,) or (N, 1) give a histogram instead."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim == 1 or xy.shape[1] == 1:
        return histogram_plot(xy.reshape(-1), path, xlabel=xlabel, title=title, labels=labels)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    sel = _subset(len(xy))
    size = max(0.5, min(8.0, 3000.0 / max(len(sel), 1)))
    if labels is None:
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, alpha=0.3, color="#3b6ea5", linewidths=0, rasterized=True)
    else:
        labels = np.asarray(labels)
        ncol = 10 if labels.max(initial=0) < 10 else 20
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, alpha=0.5, c=labels[sel] % ncol, cmap=f"tab{ncol}", vmin=0,
                   vmax=ncol - 1, linewidths=0, rasterized=True)
    if points is not None:
        points = np.asarray(points, dtype=np.float64)
        ax.plot(points[:, 0], points[:, 1], "o-", color="black", ms=3, lw=1, label=points_label or None)
        if points_label:
            ax.legend(loc="best", fontsize=8)
    if centers is not None:
        centers = np.asarray(centers, dtype=np.float64)
        ax.scatter(centers[:, 0], centers[:, 1], s=25, c="black", marker="x")
        for i, (cx, cy) in enumerate(centers[:, :2]):
            ax.annotate(str(i), (cx, cy), textcoords="offset points", xytext=(3, 3), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def density_plot(xy: np.ndarray, path: str | Path, xlabel: str = "", ylabel: str = "", title: str = "",
                 gridsize: int = 60) -> Path:
    """Hexagonal-bin density (log counts) of 2-D coordinates ``xy`` (N, 2); 1-D gives a histogram."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim == 1 or xy.shape[1] == 1:
        return histogram_plot(xy.reshape(-1), path, xlabel=xlabel, title=title)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=gridsize, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="particles (log scale)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)


def histogram_plot(x: np.ndarray, path: str | Path, xlabel: str = "", title: str = "",
                   labels: np.ndarray | None = None, bins: int = 80) -> Path:
    """Histogram of 1-D values ``x`` (N,), stacked by ``labels`` when given."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if labels is None:
        ax.hist(x, bins=bins, color="#3b6ea5")
    else:
        labels = np.asarray(labels)
        groups = [x[labels == k] for k in np.unique(labels)]
        ax.hist(groups, bins=bins, stacked=True, label=[str(k) for k in np.unique(labels)])
        if len(groups) <= 20:
            ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)
