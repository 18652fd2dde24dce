"""Figure of kernel-regression maps: particles behind each frequency shell, and the half-map FSC, per point."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.plots import save_png
from cryohet.reconstruct.fsc import resolution_at, shell_frequencies


def plot_kernel_maps(path: str | Path, per_shell: list[np.ndarray], fscs: list[np.ndarray], box: int,
                     apix: float) -> Path:
    """Left: the particles behind each shell of each point's map (log scale); right: the FSC of each point's
    half-maps, labelled with its resolution at 0.143."""
    freqs = shell_frequencies(box, apix)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_n, ax_f = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (n, curve) in enumerate(zip(per_shell, fscs, strict=True)):
        ax_n.step(freqs, n, where="mid", lw=1.2, label=f"point {i}")
        ax_f.plot(freqs, curve, lw=1.0, label=f"{i}: {resolution_at(curve, box, apix):.2f} Å")
    ax_n.set_yscale("log")
    ax_n.set_xlabel("spatial frequency (1/Å)")
    ax_n.set_ylabel("particles behind the shell")
    ax_n.set_title("neighbourhood chosen by cross-validation")
    ax_f.axhline(0.143, color="grey", ls="--", lw=0.8)
    ax_f.set_ylim(-0.1, 1.05)
    ax_f.set_xlabel("spatial frequency (1/Å)")
    ax_f.set_ylabel("FSC between half-maps")
    for ax in (ax_n, ax_f):
        if len(fscs) <= 12:
            ax.legend(fontsize=7)
    return save_png(fig, path, dpi=100)
