"""Local resolution: the FSC of two half-maps inside a soft spherical window moved over the map.

As RELION's and blocres's local resolution: at each centre of a coarse grid the half-maps are cut out in a cube of
``window_px``, multiplied by a soft sphere, Fourier transformed, and their FSC crosses ``threshold`` at the local
resolution; the coarse grid is interpolated back to the map's voxels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cryohet.geometry.fourier import fft3c, radius_grid
from cryohet.geometry.masks import sphere_mask


def default_window_px(box: int) -> int:
    """An even window of a quarter of the box, at least 12 px and at most the box."""
    return min(box, max(12, 2 * round(box / 8)))


def local_resolution(half1: torch.Tensor, half2: torch.Tensor, apix: float, window_px: int | None = None,
                     step_px: int | None = None, threshold: float = 0.143, batch: int = 256) -> torch.Tensor:
    """Local resolution in Å per voxel (box, box, box) from two half-maps at ``apix`` Å/pixel.

    ``window_px``: edge of the cube cut out around each centre (default ``default_window_px``), with a soft sphere
    of its diameter inside; ``step_px``: spacing of the centres (default a quarter of the window). Where the FSC
    never drops below ``threshold`` the resolution is the window's Nyquist (2 · apix).
    """
    box = half1.shape[-1]
    w = window_px or default_window_px(box)
    if w > box or w < 8:
        raise ValueError(f"local resolution window of {w} px: it must be 8 px to the box ({box} px)")
    step = step_px or max(1, w // 4)
    window = sphere_mask(w, w / 2 - 2, 2.0, half1.device)
    shells = torch.round(radius_grid(w, 3, half1.device)).long().flatten()
    n_sh = w // 2 + 1
    keep = shells < n_sh
    s_keep = shells[keep]
    cubes = [h.float().unfold(0, w, step).unfold(1, w, step).unfold(2, w, step) for h in (half1, half2)]
    grid_shape = cubes[0].shape[:3]
    c1, c2 = (c.reshape(-1, w, w, w) for c in cubes)
    freqs = torch.arange(n_sh, dtype=torch.float64, device=half1.device) / (w * apix)
    res = torch.empty(len(c1), dtype=torch.float64, device=half1.device)
    for s in range(0, len(c1), batch):
        a, b = (fft3c(c[s:s + batch] * window).reshape(-1, w**3)[:, keep].to(torch.complex128) for c in (c1, c2))
        n = len(a)

        def shell_sum(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), n_sh, dtype=torch.float64, device=x.device).index_add_(1, s_keep, x)

        num = shell_sum((a * b.conj()).real)
        curve = num / torch.sqrt(shell_sum(a.abs() ** 2) * shell_sum(b.abs() ** 2)).clamp_min(1e-30)
        below = curve[:, 1:] < threshold
        first = torch.where(below.any(1), below.float().argmax(1) + 1, torch.full((n,), n_sh - 1,
                                                                                    device=a.device))
        res[s:s + batch] = torch.where(below.any(1), 1.0 / freqs[first.clamp_min(1)], torch.full_like(
            freqs[first], 2.0 * apix))
    coarse = res.reshape(1, 1, *grid_shape).float()
    # the coarse grid's centres lie at w/2 + i·step; resample it onto every voxel (edges held)
    full = F.interpolate(coarse, size=tuple((g - 1) * step + 1 for g in grid_shape), mode="trilinear",
                         align_corners=True)[0, 0]
    lo = w // 2
    pad = [lo, box - lo - full.shape[2], lo, box - lo - full.shape[1], lo, box - lo - full.shape[0]]
    out = F.pad(full[None, None], [max(p, 0) for p in pad], mode="replicate")[0, 0]
    return out[:box, :box, :box]


def summarise(locres: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Median and 5-95 % range of the local resolution (inside ``mask`` > 0.5 when given), Å."""
    v = locres[mask > 0.5] if mask is not None else locres.flatten()
    q = torch.quantile(v.double().cpu(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"median_A": float(q[1]), "p5_A": float(q[0]), "p95_A": float(q[2])}

