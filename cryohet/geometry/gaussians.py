"""Points -> density map: a sum of 3-D Gaussians in torch, band-limited; and the low-pass it uses.

Each point is a 3-D Gaussian of standard deviation ``resolution_A / (pi * sqrt 2)`` (ChimeraX ``molmap``'s
rule), integrated exactly over each voxel (separable erf differences, so mass is conserved whatever the
sampling), then the map is low-passed at ``resolution_A`` with a soft raised-cosine edge so that it is
band-limited (Fourier-slice projection and reconstruction then reproduce it closely).

Map layout is RELION's: array (z, y, x); the voxel at index ``box // 2`` is the point ``centre_A``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

#: Gaussian width per Å of resolution (ChimeraX molmap: sigma = resolution / (pi * sqrt(2))).
SIGMA_PER_RESOLUTION = 1.0 / (math.pi * math.sqrt(2.0))


def _axis_profiles(pos_A: torch.Tensor, box: int, apix: float, sigma_A: float) -> torch.Tensor:
    """(N, box) voxel-integrated 1-D Gaussian profiles of N atom coordinates along one axis."""
    edges = (torch.arange(box + 1, dtype=pos_A.dtype, device=pos_A.device) - box // 2 - 0.5) * apix
    z = (edges[None, :] - pos_A[:, None]) / (math.sqrt(2.0) * sigma_A)
    cdf = 0.5 * torch.erf(z)
    return cdf[:, 1:] - cdf[:, :-1]


def lowpass_map(volume: torch.Tensor, apix: float, resolution_A: float, edge_width_A_inv: float | None = None
                ) -> torch.Tensor:
    """Low-pass a (D, D, D) map at 1/resolution_A with a raised-cosine edge (default width 1.5 Fourier shells)."""
    w = _lowpass_weights(volume.shape[-1], float(apix), float(resolution_A), edge_width_A_inv, str(volume.device),
                         volume.dtype)
    return torch.fft.irfftn(torch.fft.rfftn(volume) * w, s=volume.shape)


@functools.lru_cache(maxsize=8)
def _lowpass_weights(d: int, apix: float, resolution_A: float, edge_width_A_inv: float | None, device: str,
                     dtype: torch.dtype) -> torch.Tensor:
    f = torch.fft.fftfreq(d, d=apix, device=device, dtype=dtype)
    fr = torch.fft.rfftfreq(d, d=apix, device=device, dtype=dtype)
    k = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)
    width = edge_width_A_inv if edge_width_A_inv is not None else 1.5 / (d * apix)
    w = torch.clamp((1.0 / resolution_A + width / 2 - k) / width, 0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * w)


def render_gaussians(rel_A: torch.Tensor, weights: torch.Tensor, box: int, apix: float, resolution_A: float,
                     chunk_atoms: int = 4096) -> torch.Tensor:
    """Map (box, box, box) float32, (z, y, x), of points ``rel_A`` (N, 3) Å (x, y, z) relative to the voxel
    ``box // 2`` with ``weights`` (N,), on their device; differentiable in both (the amplitudes of Gaussian
    pseudo-atoms are fitted to a map through it). Units: weight per Å³ (before the low-pass)."""
    if len(weights) != len(rel_A):
        raise ValueError(f"{len(weights)} weights for {len(rel_A)} atoms")
    if box < 2 or box % 2:
        raise ValueError(f"box must be even, got {box}")
    sigma_A = SIGMA_PER_RESOLUTION * resolution_A
    vol = torch.zeros(box, box, box, dtype=torch.float32, device=rel_A.device)
    for s in range(0, len(rel_A), chunk_atoms):
        p, ww = rel_A[s:s + chunk_atoms], weights[s:s + chunk_atoms]
        gx, gy, gz = (_axis_profiles(p[:, i], box, apix, sigma_A).float() for i in range(3))
        zy = (gz * ww[:, None].float())[:, :, None] * gy[:, None, :]                # (n, z, y)
        vol = vol + (zy.reshape(len(p), box * box).T @ gx).reshape(box, box, box)  # (z, y, x)
    return lowpass_map(vol, apix, resolution_A) / apix**3


def gaussian_map(xyz_A: np.ndarray, weights: np.ndarray, box: int, apix: float, resolution_A: float,
                 centre_A: np.ndarray, device: torch.device | str = "cpu", chunk_atoms: int = 4096) -> np.ndarray:
    """Map (box, box, box) float32, (z, y, x), of points ``xyz_A`` (N, 3) Å (x, y, z) with ``weights`` (N,),
    the point ``centre_A`` at voxel ``box // 2``. Units: weight per Å³ (before the low-pass)."""
    xyz = np.asarray(xyz_A, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(weights, dtype=np.float64)
    rel = torch.as_tensor(xyz - np.asarray(centre_A, dtype=np.float64), dtype=torch.float64, device=device)
    with torch.no_grad():
        vol = render_gaussians(rel, torch.as_tensor(w, dtype=torch.float64, device=device), box, apix,
                               resolution_A, chunk_atoms)
    return vol.cpu().numpy()
