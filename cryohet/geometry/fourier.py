"""Centred Fourier transforms (zero frequency at index N // 2) and Fourier-space grids."""
from __future__ import annotations

import torch

_D2 = (-2, -1)
_D3 = (-3, -2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D DFT of real-space images whose origin is at index N // 2."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_D2)), dim=_D2)


def ifft2c(F: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(F, dim=_D2)), dim=_D2)


def fft3c(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=_D3), dim=_D3), dim=_D3)


def ifft3c(F: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F, dim=_D3), dim=_D3), dim=_D3)


def centered_coords(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel coordinates ``i - box // 2`` (also Fourier indices of a centred transform)."""
    return torch.arange(box, device=device, dtype=dtype) - box // 2


def freq_grid_2d(box: int, apix: float, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky, kx) spatial frequencies in 1/Å on the centred (box, box) grid."""
    k = centered_coords(box, device, dtype) / (box * apix)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return ky, kx


def radius_grid(box: int, ndim: int, device=None) -> torch.Tensor:
    """Distance from the centre in pixels (Fourier or real space), shape (box,) * ndim."""
    c = centered_coords(box, device)
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


def central_crop(F: torch.Tensor, new_box: int, ndim: int) -> torch.Tensor:
    """The central ``new_box`` (even, at most the box) of the last ``ndim`` axes of centred transforms."""
    n_old = F.shape[-1]
    if new_box == n_old:
        return F
    if new_box > n_old or new_box % 2:
        raise ValueError(f"Fourier cropping needs an even box no larger than {n_old} px, got {new_box}")
    lo = n_old // 2 - new_box // 2
    return F[(Ellipsis,) + (slice(lo, lo + new_box),) * ndim]


def _fourier_crop(x: torch.Tensor, new_box: int, ndim: int) -> torch.Tensor:
    n_old = x.shape[-1]
    if new_box == n_old:
        return x
    fwd, inv = (fft2c, ifft2c) if ndim == 2 else (fft3c, ifft3c)
    return inv(central_crop(fwd(x), new_box, ndim)).real * (new_box / n_old) ** ndim


def fourier_crop_2d(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """Downsample real images (..., N, N) to (..., n, n) by cropping their transform; keeps pixel values."""
    return _fourier_crop(images, new_box, 2)


def fourier_crop_3d(volume: torch.Tensor, new_box: int) -> torch.Tensor:
    """Downsample a map (N, N, N) to (n, n, n) by cropping its transform; keeps voxel values."""
    return _fourier_crop(volume, new_box, 3)


def fourier_resize_3d(volume: torch.Tensor, new_box: int) -> torch.Tensor:
    """A map (N, N, N) on an even ``new_box`` grid of the same extent in Å: its transform cropped (new_box < N) or
    padded with zeros (new_box > N, the old Nyquist planes left out: unpaired there, they have no place on the
    larger grid); keeps voxel values, so a crop then a pad back is a low-pass."""
    n_old = volume.shape[-1]
    if new_box <= n_old:
        return fourier_crop_3d(volume, new_box)
    if new_box % 2:
        raise ValueError(f"Fourier padding needs an even box, got {new_box}")
    lo = new_box // 2 - n_old // 2
    F = torch.zeros((new_box,) * 3, dtype=torch.complex64, device=volume.device)
    F[lo + 1:lo + n_old, lo + 1:lo + n_old, lo + 1:lo + n_old] = fft3c(volume.to(torch.float32))[1:, 1:, 1:]
    return ifft3c(F).real * (new_box / n_old) ** 3

