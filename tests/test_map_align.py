"""align_map: a map rotated and mirrored by known amounts is brought back onto the original."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.validation.map_align import align_map, rotate_maps


def test_rotated_mirrored_map_is_recovered():
    conf = hinge_conformations(default_molecule(), n_states=2, max_angle_deg=10.0, box=32, apix=3.0,
                               resolution_A=8.0)
    ref = conf.maps[0].astype(np.float32)
    R = torch.as_tensor(Rotation.from_euler("zyz", [40, 70, -120], degrees=True).as_matrix(), dtype=torch.float32)
    moved = rotate_maps(torch.from_numpy(ref), R[None])[0].numpy()[::-1].copy()     # rotated, then mirrored
    out = align_map(moved, ref, 3.0, resolution_A=20.0, step_deg=20.0)
    assert out.mirrored
    assert np.corrcoef(out.map.ravel(), ref.ravel())[0, 1] > 0.95
    before = np.corrcoef(moved.ravel(), ref.ravel())[0, 1]
    assert before < 0.6, before
