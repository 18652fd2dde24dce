"""The covariance the particles of a simulation were drawn from: the true maps weighted by their particles."""
from __future__ import annotations

import numpy as np


def true_covariance(maps: np.ndarray, state: np.ndarray, apix: float, resolution_A: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean map, principal directions (rows, unit norm over voxels) and eigenvalues (map units² · voxels) of the
    maps (K, N, N, N) band-limited to ``resolution_A`` (0: as they are), each weighted by the fraction of
    particles ``state`` (indices into ``maps``) drawn from it."""
    from cryohet.inference.ppca import band_limit

    w = np.bincount(state, minlength=len(maps)) / len(state)
    maps = band_limit(maps, apix, resolution_A).astype(np.float64)
    mean = np.tensordot(w, maps, 1)
    _, s, vt = np.linalg.svd((maps - mean).reshape(len(maps), -1) * np.sqrt(w)[:, None], full_matrices=False)
    return mean, vt, s ** 2
