"""superpose: a mean and a principal direction rotated, mirrored and shifted together are brought back together."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.validation.map_align import rotate_maps, superpose


def test_a_mean_and_its_direction_move_together():
    conf = hinge_conformations(default_molecule(), n_states=2, max_angle_deg=10.0, box=32, apix=3.0,
                               resolution_A=8.0)
    ref = conf.maps[0].astype(np.float32)
    direction = (conf.maps[1] - conf.maps[0]).astype(np.float32)
    R = torch.as_tensor(Rotation.from_euler("zyz", [40, 70, -120], degrees=True).as_matrix(), dtype=torch.float32)

    def moved(v: np.ndarray) -> np.ndarray:       # rotated, mirrored, shifted by (1, -2, 0) voxels
        out = rotate_maps(torch.from_numpy(v), R[None])[0].flip(-1)
        return torch.roll(out, shifts=(1, -2, 0), dims=(0, 1, 2)).numpy()

    turned, mirrored = superpose(np.stack([moved(ref), moved(direction)]), ref)
    assert mirrored
    assert np.corrcoef(moved(ref).ravel(), ref.ravel())[0, 1] < 0.6
    assert np.corrcoef(turned[0].ravel(), ref.ravel())[0, 1] > 0.95
    inside = np.abs(direction) > 0.05 * np.abs(direction).max()
    assert np.corrcoef(turned[1][inside], direction[inside])[0, 1] > 0.8
