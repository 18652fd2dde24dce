"""Frequency marching (#17): fit the low frequencies first and widen the resolution circle as training proceeds.

During the first ``fraction`` of the epochs the objective sees only the image pixels inside a circle whose radius
grows linearly from ``START`` of the full radius (epoch 1) towards the full radius; afterwards every pixel of
the resolution circle. The decoder is evaluated only at the pixels inside, so those epochs cost fewer FLOPs (the
cost of a step is proportional to the number of pixels, i.e. to the radius squared).
"""
from __future__ import annotations

import torch

from cryohet.inference.elbo import kl_weight

#: Radius of the fitted circle at the first epoch, as a fraction of the full circle's.
START = 0.25


def march_epochs(epochs: int, fraction: float) -> int:
    """Number of epochs (the first ones) fitted inside a reduced circle: round(fraction · epochs), 0 for none."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the marching fraction must be in [0, 1), got {fraction}")
    return int(round(fraction * epochs))


def march_radius(epoch: int, epochs: int, fraction: float) -> float:
    """Radius of the fitted circle at ``epoch`` (1-based) of ``epochs``, as a fraction of the full circle's: ``START``
    at epoch 1, growing by (1 − START) / m per epoch over the m = :func:`march_epochs` first epochs, then 1."""
    m = march_epochs(epochs, fraction)
    if epoch > m:
        return 1.0
    return START + (1.0 - START) * (epoch - 1) / m


class FrequencyMarch:
    """The pixels an objective fits at each epoch. ``kxy`` (M, 2): its pixels' frequencies, cycles/pixel;
    ``max_freq``: the full circle's radius, cycles/pixel; ``fraction``: share of the epochs spent marching."""

    def __init__(self, kxy: torch.Tensor, max_freq: float, fraction: float):
        march_epochs(1, fraction)  # validates the fraction
        self.radius_cpp = torch.linalg.vector_norm(kxy.float(), dim=-1)
        self.max_freq, self.fraction = float(max_freq), float(fraction)

    def select(self, epoch: int, epochs: int) -> tuple[torch.Tensor | None, float]:
        """(indices of the pixels fitted at ``epoch``, None for all of them; the circle's radius, cycles/pixel)."""
        frac = march_radius(epoch, epochs, self.fraction)
        if frac >= 1.0:
            return None, self.max_freq
        r = frac * self.max_freq
        return torch.nonzero(self.radius_cpp < r).squeeze(1), r


def restrict(active: torch.Tensor | None, kxy: torch.Tensor, y: torch.Tensor,
             ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frequencies (M, 2), data (B, M, 2) and CTF (B, M) at the ``active`` pixels only (all for None)."""
    if active is None:
        return kxy, y, ctf
    return kxy[active], y[:, active], ctf[:, active]


class MarchingObjective:
    """Mixin of an ELBO objective with ``kxy`` (its pixels), ``noise_dim`` (zdim), ``beta``, ``beta_warmup``
    (epochs) and ``march`` (a :class:`FrequencyMarch`): the trainer's ``start_epoch`` picks the epoch's pixels
    (``active``) and weighs the KL term per fitted pixel at the epoch's β (``epoch_beta``), as the ELBO of the data
    inside the circle; without marching or warm-up it changes nothing."""

    kxy: torch.Tensor
    noise_dim: int
    beta: float
    march: FrequencyMarch
    active: torch.Tensor | None = None
    fit_radius: float = 0.0
    kl_weight: float
    beta_warmup: int = 0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Fit the pixels of ``epoch``'s circle at the epoch's β (called by the trainer before each epoch)."""
        if self.march.fraction > 0:
            active, self.fit_radius = self.march.select(epoch, epochs)
            self.active = None if active is None else active.to(self.kxy.device)
        self.kl_weight = kl_weight(self.epoch_beta(epoch), self.noise_dim, len(self.kxy) if self.active is None
                                   else len(self.active))

    def epoch_beta(self, epoch: int) -> float:
        """β at ``epoch`` (1-based): with a warm-up of W = ``beta_warmup`` epochs it rises geometrically from
        1/zdim at epoch 1 to ``beta`` at epoch W + 1 (no change where β ≤ 1/zdim); else ``beta``."""
        b0 = 1.0 / max(self.noise_dim, 1)
        if self.beta_warmup <= 0 or self.beta <= b0 or epoch > self.beta_warmup:
            return self.beta
        return b0 * (self.beta / b0) ** ((epoch - 1) / self.beta_warmup)

    def epoch_terms(self) -> dict[str, float]:
        """The radius of the circle fitted in the epoch, cycles/pixel (nothing without marching)."""
        return {"fit_radius_cpp": self.fit_radius} if self.march.fraction > 0 else {}
