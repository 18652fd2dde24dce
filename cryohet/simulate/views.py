"""Preferred orientations of simulated particles (numpy only: the command line's help reads its constant)."""
from __future__ import annotations

import numpy as np

#: the spread of the tilts of the particles drawn near the top view (``draw_particles``' ``top_view_fraction``)
TOP_VIEW_SD_DEG = 15.0


def tilt_to_top_view(euler_deg: np.ndarray, fraction: float, rng: np.random.Generator) -> None:
    """In place: ``fraction`` of the particles (drawn at random) get tilts (``euler_deg[:, 1]``, degrees)
    |N(0, ``TOP_VIEW_SD_DEG``)| from the top view (particles lying flat on the grid); the others keep theirs."""
    n = len(euler_deg)
    top = rng.random(n) < fraction
    euler_deg[top, 1] = np.abs(rng.normal(0.0, TOP_VIEW_SD_DEG, n))[top]
