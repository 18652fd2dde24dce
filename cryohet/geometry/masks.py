"""Spherical and circular masks with a raised-cosine soft edge."""
from __future__ import annotations

import math

import torch

from cryohet.geometry.fourier import radius_grid


def _soft_edge(r: torch.Tensor, radius_px: float, soft_px: float) -> torch.Tensor:
    if soft_px <= 0:
        return (r <= radius_px).to(torch.float32)
    t = ((r - radius_px) / soft_px).clamp(0, 1)
    return (0.5 + 0.5 * torch.cos(math.pi * t)).to(torch.float32)


def circle_mask(box: int, radius_px: float, soft_px: float = 3.0, device=None) -> torch.Tensor:
    """(box, box) mask: 1 inside ``radius_px``, cosine fall-off over ``soft_px``."""
    return _soft_edge(radius_grid(box, 2, device), radius_px, soft_px)


def sphere_mask(box: int, radius_px: float | None = None, soft_px: float = 3.0, device=None) -> torch.Tensor:
    """(box, box, box) mask: 1 inside ``radius_px`` (default box/2 - soft), cosine fall-off over ``soft_px``."""
    radius_px = box / 2 - soft_px if radius_px is None else radius_px
    return _soft_edge(radius_grid(box, 3, device), radius_px, soft_px)
