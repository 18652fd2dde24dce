"""Figures for cryohet results, with matplotlib (Agg, no display) and numpy only.

Used by the Scipion viewers; usable anywhere (no Scipion import). Every function writes a file
and returns its path.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def project_2d(z: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """Two coordinates to plot: the latents themselves (dim <= 2) or their first two principal components."""
    z = np.asarray(z, dtype=float).reshape(len(z), -1)
    if z.shape[1] == 1:
        return np.column_stack([z[:, 0], np.zeros(len(z))]), ("z1", "")
    if z.shape[1] == 2:
        return z, ("z1", "z2")
    zc = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    var = s**2 / max((s**2).sum(), 1e-30)
    return zc @ vt[:2].T, (f"PC1 ({100 * var[0]:.0f}%)", f"PC2 ({100 * var[1]:.0f}%)")


def latent_scatter(z: np.ndarray, path: str | os.PathLike, color: np.ndarray | None = None,
                   color_label: str = "", title: str = "Latent space") -> str:
    """Scatter of the latent coordinates (PCA when more than two dimensions), optionally coloured."""
    xy, (xl, yl) = project_2d(z)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    if xy.shape[0] and not yl:  # 1-D: a histogram says more than a line of dots
        ax.hist(xy[:, 0], bins=min(60, max(5, len(xy) // 10)), color="tab:blue")
        ax.set_ylabel("particles")
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=4, c=color, cmap="viridis" if color is not None else None,
                        alpha=0.6, linewidths=0)
        if color is not None:
            fig.colorbar(sc, ax=ax, label=color_label)
        ax.set_ylabel(yl)
    ax.set_xlabel(xl)
    ax.set_title(f"{title} ({len(xy)} particles)")
    return _save(fig, path)


def latent_density(z: np.ndarray, path: str | os.PathLike, bins: int = 60, title: str = "Latent density") -> str:
    """2-D histogram (log counts) of the latent coordinates (PCA when more than two dimensions)."""
    xy, (xl, yl) = project_2d(z)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    if not yl:
        hist, edges = np.histogram(xy[:, 0], bins=bins)
        ax.fill_between(edges[:-1], hist, step="post", color="tab:blue", alpha=0.7)
        ax.set_ylabel("particles")
    else:
        h, xe, ye = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins)
        im = ax.imshow(np.log1p(h.T), origin="lower", aspect="auto", cmap="magma",
                       extent=(xe[0], xe[-1], ye[0], ye[-1]))
        fig.colorbar(im, ax=ax, label="log(1 + particles)")
        ax.set_ylabel(yl)
    ax.set_xlabel(xl)
    ax.set_title(title)
    return _save(fig, path)


def resolution_at(freq: np.ndarray, fsc: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold`` (linear interpolation); inf if never above."""
    freq, fsc = np.asarray(freq, float), np.asarray(fsc, float)
    start = 1 if freq.size > 1 and freq[0] == 0 else 0
    below = np.nonzero(fsc[start:] < threshold)[0]
    if below.size == 0:
        f = freq[-1]
    else:
        i = below[0] + start
        if i == 0:
            return float("inf")
        f0, f1, c0, c1 = freq[i - 1], freq[i], fsc[i - 1], fsc[i]
        f = f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1) if c0 != c1 else f0
    return float(1.0 / f) if f > 0 else float("inf")


def fsc_plot(freq: np.ndarray, curves: Mapping[str, np.ndarray], path: str | os.PathLike,
             thresholds: Sequence[float] = (0.143, 0.5), title: str = "Fourier shell correlation") -> str:
    """FSC curves against spatial frequency (1/Å), with threshold lines and the 0.143 resolution in the legend."""
    freq = np.asarray(freq, float)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        res = resolution_at(freq, curve, thresholds[0]) if thresholds else float("nan")
        ax.plot(freq, curve, lw=1.5, label=f"{label} ({res:.2f} Å)")
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, freq.max() if freq.size else 1)
    secax = ax.secondary_xaxis("top", functions=(lambda f: 1 / np.maximum(f, 1e-6), lambda r: 1 / np.maximum(r, 1e-6)))
    secax.set_xlabel("resolution (Å)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def chimerax_series(maps: Sequence[str], path: str | os.PathLike, level: float | None = None,
                    apix: float | None = None, play: bool = True) -> str:
    """A ChimeraX script opening ``maps`` as one volume series (#1), ready to play along the series."""
    if not maps:
        raise ValueError("no maps to show")
    names = " ".join(f'"{os.path.abspath(m)}"' for m in maps)
    lines = ["# cryohet: maps along the series; use the slider or 'vseries play #1'",
             f"open {names} format mrc vseries true",
             "volume #1 style surface" + (f" level {level:g}" if level is not None else "")
             + (f" voxelSize {apix:g}" if apix else ""),
             "view"]
    if play and len(maps) > 1:
        lines.append("vseries play #1 loop true direction oscillate")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
