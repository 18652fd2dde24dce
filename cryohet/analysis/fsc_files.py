"""FSC curves as RELION writes them (a STAR file with the curve and the resolution at 0.143) and as a plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cryohet.analysis.plots import save_png
from cryohet.io.star import write_star
from cryohet.reconstruct.fsc import resolution_at, shell_frequencies


def write_fsc_star(path: Path, box: int, apix: float, unmasked: np.ndarray, masked: np.ndarray | None = None) -> Path:
    """``path``: tables ``general`` (rlnFinalResolution: masked when given, rlnUnmaskedResolution) and ``fsc``."""
    freqs = shell_frequencies(box, apix)
    with np.errstate(divide="ignore"):
        ang = np.where(freqs > 0, 1.0 / np.maximum(freqs, 1e-12), 999.0)
    table = pd.DataFrame({"rlnSpectralIndex": np.arange(len(freqs)), "rlnResolution": freqs,
                          "rlnAngstromResolution": ang, "rlnFourierShellCorrelationUnmaskedMaps": unmasked})
    if masked is not None:
        table["rlnFourierShellCorrelationMaskedMaps"] = masked
    res_unmasked = resolution_at(unmasked, box, apix)
    res = resolution_at(masked, box, apix) if masked is not None else res_unmasked
    general = pd.DataFrame({"rlnFinalResolution": [res], "rlnUnmaskedResolution": [res_unmasked]})
    write_star(path, {"general": general, "fsc": table})
    return path


def plot_fsc(path: Path, box: int, apix: float, curves: dict[str, np.ndarray], ylabel: str = "FSC between half-maps"
             ) -> Path:
    """One line per curve, labelled with its resolution at FSC 0.143; the 0.143 line in grey."""
    freqs = shell_frequencies(box, apix)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(freqs, curve, label=f"{label} ({resolution_at(curve, box, apix):.2f} Å)")
    ax.axhline(0.143, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    return save_png(fig, path, dpi=100)
