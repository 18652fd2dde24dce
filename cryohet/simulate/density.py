"""Atoms -> density map: a sum of Gaussians (one per atom, weight = atomic number) in torch.

Each atom is a 3-D Gaussian of standard deviation ``0.225 * resolution_A`` (ChimeraX ``molmap``'s rule),
integrated exactly over each voxel (separable erf differences, so mass is conserved whatever the
sampling), then the map is low-passed at ``resolution_A`` with a soft raised-cosine edge so that it is
band-limited (Fourier-slice projection and reconstruction then reproduce it closely).

Map layout is RELION's: array (z, y, x); the voxel at index ``box // 2`` is the point ``centre_A``.
"""
from __future__ import annotations

import functools
import math

import gemmi
import numpy as np
import torch

from cryohet.simulate.molecules import atom_coords, atom_weights, centre_of_mass

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


def atoms_to_map(structure_or_coords: gemmi.Structure | np.ndarray, box: int, apix: float,
                 resolution_A: float = 6.0, centre_A: np.ndarray | None = None, weights: np.ndarray | None = None,
                 device: torch.device | str = "cpu", chunk_atoms: int = 4096) -> np.ndarray:
    """Density map (box, box, box) float32 of an atomic model, (z, y, x), centred in the box.

    ``structure_or_coords``: a gemmi.Structure or positions (N, 3) in Å (x, y, z). ``weights`` (N,) default to
    the atomic numbers (1 for bare coordinates). ``centre_A`` (x, y, z) is placed at voxel ``box // 2``; it
    defaults to the weighted centre of mass, pass one common centre for all states of a motion.
    Units: electrons per Å³ (before the low-pass).
    """
    if isinstance(structure_or_coords, gemmi.Structure):
        xyz = atom_coords(structure_or_coords)
        if weights is None:
            weights = atom_weights(structure_or_coords)
    else:
        xyz = np.asarray(structure_or_coords, dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(xyz):
        raise ValueError(f"{len(w)} weights for {len(xyz)} atoms")
    if box < 2 or box % 2:
        raise ValueError(f"box must be even, got {box}")
    centre = centre_of_mass(xyz, w) if centre_A is None else np.asarray(centre_A, dtype=np.float64)
    sigma_A = SIGMA_PER_RESOLUTION * resolution_A
    rel = torch.as_tensor(xyz - centre, dtype=torch.float64, device=device)
    wt = torch.as_tensor(w, dtype=torch.float64, device=device)
    vol = torch.zeros(box, box, box, dtype=torch.float32, device=device)
    for s in range(0, len(rel), chunk_atoms):
        p, ww = rel[s:s + chunk_atoms], wt[s:s + chunk_atoms]
        gx, gy, gz = (_axis_profiles(p[:, i], box, apix, sigma_A).float() for i in range(3))
        zy = (gz * ww[:, None].float())[:, :, None] * gy[:, None, :]                # (n, z, y)
        vol += (zy.reshape(len(p), box * box).T @ gx).reshape(box, box, box)       # (z, y, x)
    vol = lowpass_map(vol, apix, resolution_A) / apix**3
    return vol.cpu().numpy()


def particle_radius_A(maps: np.ndarray, apix: float, fraction: float = 0.02) -> float:
    """Radius (Å) around the box centre that holds every voxel above ``fraction`` of the maximum of any map."""
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    box = maps.shape[-1]
    support = (maps > fraction * maps.max()).any(axis=0)
    idx = np.argwhere(support) - box // 2
    if len(idx) == 0:
        return box * apix / 4
    return float(np.sqrt((idx.astype(np.float64) ** 2).sum(1)).max() * apix)
