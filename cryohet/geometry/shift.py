"""Sub-pixel image shifts as phase ramps on centred 2-D transforms."""
from __future__ import annotations

import math

import torch

from cryohet.geometry.fourier import centered_coords


def phase_shift_2d(F: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Shift the images whose centred transforms are ``F`` (B, N, N) by ``shift_px`` (B, 2) = (x, y) pixels.

    A positive x shift moves the content towards larger x (f(x - s) in real space).
    """
    n = F.shape[-1]
    k = centered_coords(n, F.device, torch.float64) / n
    shift = shift_px.to(F.device, torch.float64)
    phase = -2 * math.pi * shift[:, :, None] * k  # (B, 2, N): x and y ramps; the 2-D ramp is their product
    ramp = torch.polar(torch.ones_like(phase), phase).to(F.dtype)
    return F * ramp[:, 1, :, None] * ramp[:, 0, None, :]


def apply_origin(F: torch.Tensor, origin_px: torch.Tensor) -> torch.Tensor:
    """Image formation: move a centred projection by −origin, as relion_project does.

    ``origin_px`` (B, 2) is (rlnOriginXAngst, rlnOriginYAngst) / apix. Checked against relion_project.
    """
    return phase_shift_2d(F, -origin_px)


def undo_origin(F: torch.Tensor, origin_px: torch.Tensor) -> torch.Tensor:
    """Centre particle images before backprojection (shift by +origin, as relion_reconstruct)."""
    return phase_shift_2d(F, origin_px)
