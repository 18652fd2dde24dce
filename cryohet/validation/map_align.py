"""Superpose a map on a reference by rotation and hand (maps reconstructed without poses, e.g. CryoGAN's, are in an
arbitrary frame and hand): an exhaustive search over an SO(3) grid for each hand on Fourier-cropped maps, then a
local random search, maximising the real-space correlation. Both maps are taken as centred (no translation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.geometry.lattice import box_for_resolution
from cryohet.inference.pose_grid import so3_grid


@dataclass
class AlignedMap:
    map: np.ndarray          # the moving map (mirrored when ``mirrored``) rotated onto the reference
    rotation: np.ndarray     # (3, 3): aligned(x) = moving'(R x), x = (x, y, z) voxels from the centre
    mirrored: bool           # moving' is the moving map mirrored in z
    correlation: float       # real-space correlation with the reference at the search's resolution


def rotate_maps(vol: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(n, n, n) map and (M, 3, 3) rotations -> (M, n, n, n) maps out(x) = vol(R x) (trilinear, zero outside)."""
    n = vol.shape[-1]
    c = (torch.arange(n, dtype=torch.float32) - n // 2)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    xyz = torch.stack([x, y, z], -1).reshape(-1, 3)
    pos = torch.einsum("mij,pj->mpi", R.to(torch.float32), xyz)               # (M, n³, 3) as (x, y, z)
    grid = (pos + n // 2) / (n - 1) * 2 - 1
    out = F.grid_sample(vol[None, None].expand(len(R), 1, n, n, n), grid.reshape(len(R), n, n, n, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0]


def _scores(moving: torch.Tensor, ref: torch.Tensor, R: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    ref = (ref - ref.mean()) / ref.std()
    out = []
    for s in range(0, len(R), chunk):
        r = rotate_maps(moving, R[s:s + chunk]).flatten(1)
        r = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True).clamp_min(1e-12)
        out.append((r * ref.flatten()).mean(1))
    return torch.cat(out)


def align_map(moving: np.ndarray, reference: np.ndarray, apix: float, resolution_A: float = 20.0,
              step_deg: float = 12.0, rounds: int = 4, seed: int = 0) -> AlignedMap:
    """The rotation and hand of ``moving`` that best match ``reference`` (maps of one box and pixel size),
    searched at ``resolution_A`` on an SO(3) grid of ``step_deg`` then by ``rounds`` of 200 random perturbations
    of halving size."""
    n = reference.shape[-1]
    m = box_for_resolution(n, apix, resolution_A)
    ref = fourier_crop_3d(torch.as_tensor(reference, dtype=torch.float32), m)
    rng = np.random.default_rng(seed)
    grid = so3_grid(step_deg)
    best = (-np.inf, None, False)
    for mirrored in (False, True):
        mov_full = torch.as_tensor(np.ascontiguousarray(moving[::-1] if mirrored else moving), dtype=torch.float32)
        mov = fourier_crop_3d(mov_full, m)
        sc = _scores(mov, ref, grid)
        R, score = grid[int(sc.argmax())], float(sc.max())
        sigma = step_deg / 2
        for _ in range(rounds):
            kick = torch.as_tensor(Rotation.from_rotvec(rng.normal(size=(200, 3)) * np.radians(sigma)).as_matrix(),
                                   dtype=torch.float32)
            cand = torch.cat([R[None], kick @ R])
            sc = _scores(mov, ref, cand)
            R, score = cand[int(sc.argmax())], float(sc.max())
            sigma /= 2
        if score > best[0]:
            best = (score, R, mirrored)
    score, R, mirrored = best
    mov_full = torch.as_tensor(np.ascontiguousarray(moving[::-1] if mirrored else moving), dtype=torch.float32)
    aligned = rotate_maps(mov_full, R[None])[0].numpy()
    return AlignedMap(aligned, R.numpy(), mirrored, score)


def superpose(maps: np.ndarray, reference: np.ndarray, apix: float) -> tuple[np.ndarray, bool]:
    """Maps (K, n, n, n) of one frame (a mean and its principal directions) turned by the rotation and hand that
    superpose the first on ``reference``; and whether they were mirrored."""
    a = align_map(maps[0], reference, apix)
    flipped = maps[:, ::-1] if a.mirrored else maps
    R = torch.as_tensor(a.rotation)[None]
    return np.stack([rotate_maps(torch.as_tensor(np.ascontiguousarray(m)), R)[0].numpy() for m in flipped]), a.mirrored
