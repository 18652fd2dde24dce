"""The evidence lower bound of a latent-variable volume model with known poses (cryoDRGN's objective).

Per image: the mean over the half-plane pixels of |CTF · slice − data|² (equal to cryoDRGN's Hartley-domain
MSE; the other half of the plane is the complex conjugate) plus β · KL(q(z) ‖ N(0, I)) / (2 · pixels), with
q(z) = N(μ, diag exp(logvar)) given by any inference strategy (an encoder, a per-particle table).
"""
from __future__ import annotations

import torch
from torch import nn


def kl_weight(beta: float, zdim: int, n_points: int) -> float:
    """Weight of the KL term: β (0: 1/zdim, cryoDRGN's default) over twice the number of half-plane pixels."""
    b = beta if beta > 0 else 1.0 / max(zdim, 1)
    return b / (2 * n_points)


def gaussian_elbo(volume: nn.Module, kxy: torch.Tensor, rot: torch.Tensor, y: torch.Tensor, ctf: torch.Tensor,
                  mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, base: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction error, KL) averaged over the batch; ``y`` (B, M, 2) real/imaginary data, ``ctf`` (B, M);
    ``base``: an anchored volume's base slices at ``rot`` and ``kxy`` when already computed."""
    mu, logvar = mu.float(), logvar.float()
    z = mu + eps * torch.exp(0.5 * logvar)
    pred = (volume.slices(rot, z, kxy) if base is None else volume.slices(rot, z, kxy, base)).float() * ctf[..., None]
    gen = ((pred - y) ** 2).sum(-1).mean()
    kld = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
    return gen, kld
