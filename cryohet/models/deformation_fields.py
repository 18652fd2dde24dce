"""Displacement fields d(z, x) of a canonical map: Zernike3D (flexutils) and a neural flow field (3DFlex class).

Both are ``nn.Module``s called as ``field(z, x_A)``: latents ``z`` (B, zdim) and canonical points ``x_A`` (P, 3) Å
(x, y, z) relative to the box centre -> displacements (B, P, 3) Å; both are zero at the start of training (their
last layer starts at zero), so the deformed map starts at the canonical one. Their outputs are in units of
R / ``OUTPUT_FRACTION`` Å (R the ball's radius, ``radius_A``), so that the optimiser's steps are a fixed fraction of
the molecule's size whatever its size.

* ``ZernikeField``: d(z, x) = Σ_j c_j(z) Z_j(x / R), the Zernike3D basis (``geometry.zernike3d``) of the ball of
  radius ``radius_A``, with the 3·K coefficients (Å) a linear map of z (``hidden`` = 0) or a small MLP of z. Zero
  outside the ball, as flexutils'.
* ``FlowField``: d(z, x) = MLP(γ(x / R), z), γ the NeRF positional encoding sin/cos(2^f π x / R), f < ``n_freq``,
  with x itself.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cryohet.geometry.zernike3d import basis_degrees, zernike3d_basis
from cryohet.models.neural import ResidMLP, init_linear

FIELDS = ("zernike", "flow")
#: the fields' outputs are in units of radius_A / OUTPUT_FRACTION Å
OUTPUT_FRACTION = 4.0


def _zero_last(mlp: ResidMLP) -> None:
    with torch.no_grad():
        mlp.out.weight.zero_()
        mlp.out.bias.zero_()


class ZernikeField(nn.Module):
    """Zernike3D coefficients (Å) for x, y and z of degrees ``l1``, ``l2`` from z (``zdim``): linear
    (``hidden`` = 0) or a ``layers``-layer MLP of width ``hidden``."""

    kind = "zernike"

    def __init__(self, zdim: int, radius_A: float, l1: int = 3, l2: int = 2, hidden: int = 0, layers: int = 1,
                 seed: int = 0):
        super().__init__()
        self.zdim, self.radius_A, self.l1, self.l2 = int(zdim), float(radius_A), int(l1), int(l2)
        self.hidden, self.layers, self.seed = int(hidden), int(layers), int(seed)
        self.degrees = basis_degrees(self.l1, self.l2)
        n_out = 3 * len(self.degrees)
        if self.hidden:
            self.coeffs: nn.Module = ResidMLP(self.zdim, self.layers, self.hidden, n_out)
            init_linear(self.coeffs, torch.Generator().manual_seed(self.seed))
            _zero_last(self.coeffs)
        else:
            self.coeffs = nn.Linear(self.zdim, n_out)
            nn.init.zeros_(self.coeffs.weight)
            nn.init.zeros_(self.coeffs.bias)

    @property
    def n_basis(self) -> int:
        return len(self.degrees)

    def basis(self, x_A: torch.Tensor) -> torch.Tensor:
        """The basis (P, K) at points ``x_A`` (P, 3) Å from the box centre."""
        return zernike3d_basis(x_A.float() / self.radius_A, self.degrees)

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """Coefficients (B, 3, K) Å of x, y, z at latents ``z`` (B, zdim)."""
        return self.coeffs(z).float().reshape(len(z), 3, self.n_basis) * (self.radius_A / OUTPUT_FRACTION)

    def forward(self, z: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_A.device.type, enabled=False):
            return torch.einsum("pk,bck->bpc", self.basis(x_A), self.coefficients(z))

    def architecture(self) -> dict[str, Any]:
        return {"field": self.kind, "zdim": self.zdim, "radius_A": self.radius_A, "l1": self.l1, "l2": self.l2,
                "hidden": self.hidden, "layers": self.layers, "seed": self.seed}


class FlowField(nn.Module):
    """MLP of (positional encoding of x / ``radius_A`` with ``n_freq`` octaves, z) -> displacement (Å); ``layers``
    hidden layers of width ``hidden``, the last layer zero."""

    kind = "flow"

    def __init__(self, zdim: int, radius_A: float, n_freq: int = 4, hidden: int = 64, layers: int = 2,
                 seed: int = 0):
        super().__init__()
        self.zdim, self.radius_A, self.n_freq = int(zdim), float(radius_A), int(n_freq)
        self.hidden, self.layers, self.seed = int(hidden), int(layers), int(seed)
        self.register_buffer("octaves", math.pi * 2.0 ** torch.arange(self.n_freq, dtype=torch.float32),
                             persistent=False)
        self.mlp = ResidMLP(3 + 6 * self.n_freq + self.zdim, self.layers, self.hidden, 3)
        init_linear(self.mlp, torch.Generator().manual_seed(self.seed))
        _zero_last(self.mlp)

    def encode(self, x_A: torch.Tensor) -> torch.Tensor:
        """(P, 3 + 6·n_freq) features of points ``x_A`` (P, 3) Å."""
        u = x_A.float() / self.radius_A
        arg = (u[:, :, None] * self.octaves).reshape(len(u), -1)
        return torch.cat([u, torch.sin(arg), torch.cos(arg)], -1)

    def forward(self, z: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x_A)
        # the first layer on (features, z) as the sum of its parts: (P, h) + (B, 1, h), not a (B, P, ·) input
        w, nf = self.mlp.first.weight, feats.shape[1]
        h = (F.linear(feats.to(w.dtype), w[:, :nf], self.mlp.first.bias)
             + F.linear(z.to(w.dtype), w[:, nf:])[:, None, :])
        return self.mlp.body(h).float() * (self.radius_A / OUTPUT_FRACTION)

    def architecture(self) -> dict[str, Any]:
        return {"field": self.kind, "zdim": self.zdim, "radius_A": self.radius_A, "n_freq": self.n_freq,
                "hidden": self.hidden, "layers": self.layers, "seed": self.seed}


def make_field(arch: dict[str, Any]) -> ZernikeField | FlowField:
    """The field an ``architecture()`` describes."""
    kw = {k: v for k, v in arch.items() if k != "field"}
    if arch["field"] == "zernike":
        return ZernikeField(**kw)
    if arch["field"] == "flow":
        return FlowField(**kw)
    raise ValueError(f"unknown displacement field {arch['field']!r} (known: {', '.join(FIELDS)})")
