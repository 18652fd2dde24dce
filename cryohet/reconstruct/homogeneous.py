"""Homogeneous reconstruction: CTF-weighted Fourier backprojection of random half-sets, FSC-based Wiener filter."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cryohet.geometry.backproject import BackProjector
from cryohet.geometry.ctf import ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.fourier import fft2c
from cryohet.geometry.shift import undo_origin
from cryohet.reconstruct.fsc import fsc, resolution_at


@dataclass
class Reconstruction:
    full: torch.Tensor          # (box, box, box)
    half1: torch.Tensor
    half2: torch.Tensor
    fsc: np.ndarray             # unmasked half-map FSC per shell
    fsc_masked: np.ndarray | None
    apix: float

    @property
    def box(self) -> int:
        return self.full.shape[-1]

    def resolution(self, threshold: float = 0.143, masked: bool = True) -> float:
        curve = self.fsc_masked if masked and self.fsc_masked is not None else self.fsc
        return resolution_at(curve, self.box, self.apix, threshold)


def crop_fourier(F: torch.Tensor, box: int) -> torch.Tensor:
    """Keep the central (box, box) of centred transforms (..., N, N)."""
    n = F.shape[-1]
    lo = n // 2 - box // 2
    return F[..., lo:lo + box, lo:lo + box]


def backproject_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], pset, box: int, apix: float,
                        device: torch.device, pad: int = 2) -> BackProjector:
    """Insert (indices, images) batches of ``pset`` (images at ``pset.apix``; cropped to ``box``)."""
    bp = BackProjector(box, pad, device)
    for idx, images in batches:
        F = fft2c(torch.as_tensor(images, device=device, dtype=torch.float32))  # single precision, as RELION
        origin_px = torch.as_tensor(pset.shift_A[idx] / pset.apix, device=device)
        F = crop_fourier(undo_origin(F, origin_px), box)
        ctf = ctf_2d(pset.ctf.take(idx), box, apix, device=device, dtype=torch.float64)
        A = torch.as_tensor(euler_to_matrix(pset.euler_deg[idx]), device=device)
        bp.insert(F, ctf, A)
    bp.flush()
    return bp


def ssnr_regularisation(bp: BackProjector, ssnr: np.ndarray) -> torch.Tensor:
    """λ per shell = mean weight in the shell / SSNR (Wiener filter from the signal-to-noise ratio)."""
    shells = bp.shell_index()
    n = len(ssnr)
    keep = shells < n
    s = shells[keep]
    sums = torch.zeros(n, dtype=torch.float64, device=bp.device).index_add_(0, s, bp.weight[keep])
    counts = torch.zeros(n, dtype=torch.float64, device=bp.device).index_add_(0, s, torch.ones_like(bp.weight[keep]))
    mean_w = sums / counts.clamp_min(1)
    return mean_w / torch.as_tensor(ssnr, device=bp.device).clamp_min(1e-6)


def ssnr_from_fsc(curve: np.ndarray) -> np.ndarray:
    """SSNR of one half-map per shell from the half-map FSC (FSC / (1 - FSC)), kept positive."""
    c = np.clip(curve, 1e-3, 0.999)
    return c / (1 - c)


def reconstruct_halves(pset, half: np.ndarray, batch_size: int, device: torch.device, box: int | None = None,
                       wiener: str = "auto", mask: torch.Tensor | None = None,
                       progress: Callable[[Iterable, str, int], Iterator] | None = None) -> Reconstruction:
    """Reconstruct the half-sets given by ``half`` (values 1 or 2 per particle) and their sum.

    ``wiener``: "auto" (λ from the half-map FSC), "none" (plain division, as relion_reconstruct), or a number
    c (λ = c × mean weight per shell, i.e. a constant SSNR of 1/c).
    """
    box = box or pset.box
    apix = pset.apix * pset.box / box
    bps = []
    for h in (1, 2):
        idx = np.nonzero(half == h)[0]
        if len(idx) == 0:
            raise ValueError(f"half-set {h} is empty: at least two particles are needed")
        batches = pset.iter_batches(batch_size, idx)
        n_batches = -(-len(idx) // batch_size)
        if progress is not None:
            batches = progress(batches, f"backprojecting half-set {h}", n_batches)
        bps.append(backproject_batches(batches, pset, box, apix, device))
    maps = [bp.reconstruct() for bp in bps]
    raw_fsc = fsc(*maps)
    if wiener == "none":
        lam_half = [0.0, 0.0]
        lam_full = 0.0
    elif wiener == "auto":
        ssnr = ssnr_from_fsc(raw_fsc)
        lam_half = [ssnr_regularisation(bp, ssnr) for bp in bps]
        lam_full = None
    else:
        c = float(wiener)
        lam_half = [ssnr_regularisation(bp, np.full(box // 2 + 1, 1 / c)) for bp in bps]
        lam_full = None
    half_maps = [bp.reconstruct(lam) for bp, lam in zip(bps, lam_half)]
    full_bp = bps[0]
    full_bp.add(bps[1])
    if lam_full is None:
        ssnr_full = 2 * ssnr_from_fsc(raw_fsc) if wiener == "auto" else np.full(box // 2 + 1, 1 / float(wiener))
        lam_full = ssnr_regularisation(full_bp, ssnr_full)
    full = full_bp.reconstruct(lam_full)
    curve = fsc(*half_maps)
    curve_masked = fsc(half_maps[0] * mask, half_maps[1] * mask) if mask is not None else None
    return Reconstruction(full, half_maps[0], half_maps[1], curve, curve_masked, apix)


def random_halves(n: int, rng: np.random.Generator, existing: np.ndarray | None = None) -> np.ndarray:
    """Half-set label (1 or 2) per particle: ``existing`` (rlnRandomSubset) when valid, else a random even split."""
    if existing is not None and set(np.unique(existing)) == {1, 2}:
        return existing.astype(int)
    half = np.ones(n, dtype=int)
    half[rng.permutation(n)[: n // 2]] = 2
    return half
