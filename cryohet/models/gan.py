"""CryoGAN's two networks (Gupta et al. 2020, 2021; survey section 8): a generator of volumes and a critic of images.

The generator is the volume itself, learnable voxels on the working box n inside a soft sphere (CryoGAN); with
``zdim > 0`` it is a distribution of volumes V(z) = M ⊙ (X_0 + Σ_k z_k W_k), z ~ N(0, I), a mean plus a linear
low-rank map of the latent (Multi-CryoGAN with the simplest decoder: its covariance W Wᵀ has the principal
volumes as eigenvectors). Its projections are Fourier slices of every map at once (``ProjectorStack``), so an
image of V(z) costs one interpolation pass whatever z. The critic is a small strided CNN on real-space images
with no normalisation layers (the gradient penalty of WGAN-GP acts per sample).
"""
from __future__ import annotations

import torch
from torch import nn

from cryohet.geometry.fourier import centered_coords
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import ProjectorStack


class VolumeGenerator(nn.Module):
    """V(z) = mask ⊙ scale · (X_0 + Σ_k z_k W_k) on an (n, n, n) box; ``scale`` (map units) sets the step size of
    the parameters (Adam moves them by about the learning rate each step)."""

    def __init__(self, n: int, zdim: int, radius_px: float, scale: float):
        super().__init__()
        self.n, self.zdim, self.scale = n, zdim, float(scale)
        self.mean = nn.Parameter(torch.zeros((n, n, n)))
        self.components = nn.Parameter(torch.zeros((zdim, n, n, n)))
        self.register_buffer("mask", sphere_mask(n, radius_px, soft_px=2.0))
        k = centered_coords(n) / n
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        self.register_buffer("kxy", torch.stack([kx.flatten(), ky.flatten()], 1))   # (n², 2) cycles/pixel
        self.register_buffer("inside", (kx ** 2 + ky ** 2 <= 0.25).to(torch.float32))

    def maps(self) -> torch.Tensor:
        """(1 + zdim, n, n, n): X_0 then W_1..W_zdim, in map units."""
        return torch.cat([self.mean[None], self.components]) * (self.mask * self.scale)

    def projector(self) -> ProjectorStack:
        """The padded transforms of X_0 and the W_k (differentiable; build once per set of parameters)."""
        return ProjectorStack(self.maps())

    def slices(self, projector: ProjectorStack, A: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Centred transforms (B, n, n) of the projections of V(z_b) at RELION rotations A (B, 3, 3); z (B, zdim)
        (None when zdim is 0); ``projector`` from :meth:`projector`. Zero beyond Nyquist."""
        s = projector.slice_points(A, self.kxy)                                    # (1 + zdim, B, n²)
        if self.zdim:
            s = s[0] + torch.einsum("kbm,bk->bm", s[1:], z.to(s.dtype))
        else:
            s = s[0]
        return s.reshape(-1, self.n, self.n) * self.inside


class ImageCritic(nn.Module):
    """WGAN critic: (B, n, n) real-space images -> (B,) scores; three stride-2 convolutions (n a multiple of 8)."""

    def __init__(self, n: int, width: int = 32):
        super().__init__()
        if n % 8:
            raise ValueError(f"the critic needs a box that is a multiple of 8, got {n}")
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(4 * w * (n // 8) ** 2, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images[:, None]).squeeze(1)
