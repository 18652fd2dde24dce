"""Fourier shell correlation between two maps, and the resolution where it crosses a threshold."""
from __future__ import annotations

import numpy as np
import torch

from cryohet.geometry.fourier import fft3c, ifft3c, radius_grid

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2.0 renamed trapz (removed in 2.4)


def fsc(v1: torch.Tensor | np.ndarray, v2: torch.Tensor | np.ndarray) -> np.ndarray:
    """FSC per shell 0 .. box // 2 (shell i is spatial frequency i / (box · apix))."""
    a, b = (torch.from_numpy(np.array(v)) if not isinstance(v, torch.Tensor) else v for v in (v1, v2))
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"FSC needs two maps of the same cubic shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    box = a.shape[-1]
    F1, F2 = fft3c(a.double()), fft3c(b.to(a.device).double())
    shells = torch.round(radius_grid(box, 3, a.device)).long().flatten()
    keep = shells <= box // 2
    s = shells[keep]
    n = box // 2 + 1
    f1, f2 = F1.flatten()[keep], F2.flatten()[keep]
    num = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, s, (f1 * f2.conj()).real)
    p1 = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, s, f1.abs() ** 2)
    p2 = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, s, f2.abs() ** 2)
    return (num / torch.sqrt(p1 * p2).clamp_min(1e-30)).cpu().numpy()


def shell_frequencies(box: int, apix: float) -> np.ndarray:
    """Spatial frequency of each FSC shell in 1/Å."""
    return np.arange(box // 2 + 1) / (box * apix)


def resolution_at(curve: np.ndarray, box: int, apix: float, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first drops below ``threshold`` (linear interpolation between shells).

    Returns the Nyquist resolution (2 · apix) when it never drops below.
    """
    freqs = shell_frequencies(box, apix)
    below = np.nonzero(curve[1:] < threshold)[0]
    if len(below) == 0:
        return 2.0 * apix
    i = below[0] + 1
    f0, f1, c0, c1 = freqs[i - 1], freqs[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1.0 / f) if f > 0 else float("inf")


def fsc_auc(curve: np.ndarray) -> float:
    """Area under the FSC curve over shells 1 .. Nyquist, normalised to [0, 1] (CryoBench's AUC)."""
    return float(_trapezoid(curve[1:], dx=1.0 / (len(curve) - 2)))


def fsc_weight(curve: np.ndarray) -> np.ndarray:
    """Per-shell weight of a map averaged from two half-maps with this FSC: sqrt(2 FSC / (1 + FSC)) (RELION's
    FSC weighting; 0 where the FSC is not positive)."""
    c = np.clip(curve, 0, 1)
    return np.sqrt(2 * c / (1 + c))


def weight_shells(vol: torch.Tensor, weight: np.ndarray) -> torch.Tensor:
    """A map (box, box, box) with its Fourier shell i (rounded radius, as :func:`fsc`) multiplied by
    ``weight[i]`` (shells beyond the last weight take the last); a diagonal operation in FSC shells."""
    w = torch.as_tensor(weight, dtype=torch.float64, device=vol.device)
    shell = torch.round(radius_grid(vol.shape[-1], 3, vol.device)).long().clamp_max(len(w) - 1)
    return ifft3c(fft3c(vol.double()) * w[shell]).real.to(vol.dtype)


def fsc_shell_weights(curve: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Per-shell weights :func:`fsc_weight` of a half-map FSC; with ``threshold`` also a low-pass: zero from the
    first shell past the DC whose FSC is below it."""
    weight = fsc_weight(curve)
    if threshold is not None:
        below = np.nonzero(np.asarray(curve)[1:] < threshold)[0]
        if len(below):
            weight[below[0] + 1:] = 0.0
    return weight


def fsc_weighted_average(h1: torch.Tensor, h2: torch.Tensor, threshold: float | None = None
                         ) -> tuple[torch.Tensor, np.ndarray]:
    """The average of two half-maps (box, box, box) weighted per shell by :func:`fsc_shell_weights` of their FSC
    (``threshold``: also low-passed there), so that shells the halves do not agree on fade out instead of adding
    noise; and that FSC (shells 0 .. box // 2)."""
    curve = fsc(h1, h2)
    return weight_shells(0.5 * (h1 + h2.to(h1.device)), fsc_shell_weights(curve, threshold)), curve
