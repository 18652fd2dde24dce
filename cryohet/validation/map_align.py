"""Superposition of a map on a reference when its orientation, position and hand are arbitrary (ab initio maps):
a global search over a rotation grid for each hand, the best translation of each rotation by FFT
cross-correlation, then shrinking local grids around the best rotations."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryohet.geometry.fourier import centered_coords, fourier_crop_3d
from cryohet.inference.pose_grid import so3_grid
from cryohet.inference.pose_search import _offsets, rotation_from_vector


@dataclass
class Alignment:
    """``aligned``: the moving map (mirrored first when ``mirrored``, x -> −x) rotated by ``rotation`` and shifted
    by ``shift_px`` (voxels, z y x) onto the reference; ``correlation``: their normalised cross-correlation."""

    aligned: np.ndarray
    rotation: np.ndarray
    mirrored: bool
    shift_px: tuple[int, int, int]
    correlation: float


def rotate_maps(vol: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """vol (n, n, n) -> (B, n, n, n) with out(x) = vol(Rᵀ x) about the centre voxel n // 2 (trilinear; x, y, z
    the last, middle and first axes; zero outside)."""
    n = vol.shape[-1]
    c = centered_coords(n, vol.device, vol.dtype)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    xyz = torch.stack([x, y, z], -1).reshape(-1, 3)
    src = xyz @ R.to(vol.dtype)                                                  # (B, n³, 3): Rᵀ x per row
    grid = ((src + n // 2) / (n - 1) * 2 - 1).reshape(len(R), n, n, n, 3)
    out = torch.nn.functional.grid_sample(vol[None, None].expand(len(R), 1, n, n, n), grid, mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out[:, 0]


def _scores(rotated: torch.Tensor, ref_ft: torch.Tensor, ref_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best normalised cross-correlation over circular shifts (B,) and the flat index of that shift."""
    rot = rotated - rotated.mean((1, 2, 3), keepdim=True)
    cc = torch.fft.ifftn(torch.fft.fftn(rot, dim=(1, 2, 3)) * ref_ft.conj(), dim=(1, 2, 3)).real
    best, idx = cc.reshape(len(rot), -1).max(1)
    return best / (rot.reshape(len(rot), -1).norm(dim=1) * ref_norm).clamp_min(1e-30), idx


def align_map(moving: np.ndarray, reference: np.ndarray, step_deg: float = 20.0, coarse_box: int = 12,
              levels: int = 4, keep: int = 3, batch: int = 512) -> Alignment:
    """Superpose ``moving`` on ``reference`` (same cubic box): rotations every ``step_deg`` at a Fourier crop to
    ``coarse_box`` for both hands, then ``levels`` local grids (27 rotations, half the step each time) at the
    full box around the ``keep`` best of each hand."""
    mov = torch.as_tensor(np.asarray(moving, dtype=np.float32))
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32))
    if mov.shape != ref.shape or mov.ndim != 3:
        raise ValueError(f"maps of the same cubic box are needed, got {tuple(mov.shape)} and {tuple(ref.shape)}")
    n = ref.shape[-1]
    nc = min(n, coarse_box)

    def prepared(v: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        v = fourier_crop_3d(v, box) if box < n else v
        v0 = v - v.mean()
        return v, torch.fft.fftn(v0), float(v0.norm())

    grid = so3_grid(step_deg)
    candidates = []
    for mirrored in (False, True):
        m = mov.flip(-1) if mirrored else mov
        small, (_, ref_ft, ref_norm) = prepared(m, nc)[0], prepared(ref, nc)
        sc = torch.cat([_scores(rotate_maps(small, grid[s:s + batch]), ref_ft, ref_norm)[0]
                        for s in range(0, len(grid), batch)])
        for i in sc.topk(keep).indices:
            candidates.append((mirrored, grid[i]))
    _, ref_ft, ref_norm = prepared(ref, n)
    best: tuple[float, bool, torch.Tensor, int] | None = None
    for mirrored, R in candidates:
        m = mov.flip(-1) if mirrored else mov
        step = math.radians(step_deg) / 2
        score, idx = _scores(rotate_maps(m, R[None]), ref_ft, ref_norm)
        cur = (float(score[0]), R, int(idx[0]))
        for _ in range(levels):
            dR = rotation_from_vector(_offsets(step, 3, torch.device("cpu")))
            trial = dR @ cur[1]
            s, ix = _scores(rotate_maps(m, trial), ref_ft, ref_norm)
            k = int(s.argmax())
            if float(s[k]) > cur[0]:
                cur = (float(s[k]), trial[k], int(ix[k]))
            step /= 2
        if best is None or cur[0] > best[0]:
            best = (cur[0], mirrored, cur[1], cur[2])
    assert best is not None
    score, mirrored, R, idx = best
    m = mov.flip(-1) if mirrored else mov
    shift = np.unravel_index(idx, (n, n, n))
    aligned = torch.roll(rotate_maps(m, R[None])[0], shifts=tuple(-int(s) for s in shift), dims=(0, 1, 2))
    return Alignment(aligned.numpy().astype(np.float32), R.numpy(), mirrored,
                     tuple(int((-s + n // 2) % n - n // 2) for s in shift), score)


def apply_alignment(vol: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Another map of the moving map's frame (e.g. a principal volume of the same fit) moved as ``alignment``."""
    v = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    v = v.flip(-1) if alignment.mirrored else v
    out = rotate_maps(v, torch.as_tensor(alignment.rotation)[None])[0]
    return torch.roll(out, shifts=alignment.shift_px, dims=(0, 1, 2)).numpy().astype(np.float32)


def superpose(maps: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool]:
    """Maps (K, n, n, n) of one frame (a mean and its principal directions) moved by the superposition of the first
    on ``reference``; and whether they were mirrored."""
    al = align_map(maps[0], reference)
    return np.stack([al.aligned, *(apply_alignment(m, al) for m in maps[1:])]), al.mirrored
