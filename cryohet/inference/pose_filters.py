"""A pose-aware first layer for the encoder: K learnt 3-D filters in Fourier space, each sliced at the image's pose,
CTF-weighted and correlated with the image's residual (a matched filter per filter map).

An image's response to filter k is Σ_m w_m · CTF_m · Re(conj(F_k(Aᵀ k_m)) · r_m) over the half-plane pixels m
inside the filters' resolution circle, w_m the pixel's multiplicity. Two images of the same conformation at
different poses see the same 3-D filters, so the encoder need not learn how a change of the molecule looks from
every direction; this is the per-image coordinate of a linear model (principal volumes, moments) made learnable.
The filters are Hermitian by construction (F(−k) = conj F(k)), i.e. transforms of real maps, and read by trilinear
interpolation.

The responses are linear in the filters, so they are computed through the adjoint: each image's CTF-weighted
signal is spread onto the filters' grid once (no gradient), and one matrix product with the filter values gives
every filter's response (and, backwards, their gradient), instead of interpolating every filter at every pixel.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cryohet.geometry.fourier import fft3c
from cryohet.geometry.project import plane_coords

#: (index, weight, sign) of the voxels each read pixel spreads to (``PoseFilterBank.taps``)
Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: rings between a read pixel's and those of the voxels its taps reach: the trilinear corners lie within √3 px of
#: the pixel's point, which has the pixel's radius, so the rounded radii differ by at most 2
RING_REACH = 2
#: the eight corners of a trilinear interpolation cell, (dx, dy, dz)
_CORNERS = torch.tensor([[dx, dy, dz] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])


def filter_radius(box: int, max_freq: float) -> int:
    """Radius in pixels of the filters' Fourier grid for a resolution circle of ``max_freq`` cycles/pixel."""
    return max(1, int(math.ceil(max_freq * box)))


def readable_voxels(grid: int) -> torch.Tensor:
    """(G³,) bool: the voxels of a G³ filter grid that a trilinear interpolation at up to R = G // 2 − 1 from the
    centre can touch (within R + √3)."""
    c = torch.arange(grid) - grid // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return (x**2 + y**2 + z**2).reshape(-1).float() <= (grid // 2 - 1 + 3**0.5) ** 2 + 1e-6


def filter_shape(box: int, kxy: torch.Tensor, max_freq: float) -> tuple[int, int]:
    """(voxels per filter, pixels read) of a filter bank (for the memory plan)."""
    grid = 2 * filter_radius(box, max_freq) + 3
    return int(readable_voxels(grid).sum()), int((kxy.norm(dim=-1) <= max_freq + 1e-9).sum())


class PoseFilterBank(nn.Module):
    """K filters on a G³ centred Fourier grid, G = 2R + 3, R the radius of their resolution circle in pixels of
    the box, of which only the ``n_voxels`` within R + √3 of the centre can be read. ``values`` (2·n_voxels, K):
    the real parts of those voxels (``compact[(z·G + y)·G + x]`` numbers them), then their imaginary parts.
    ``kxy`` (M, 2) cycles/pixel: the encoder's pixels; those within ``max_freq`` (cycles/pixel) are read.
    ``fixed``: the values are not learnt but set from maps (:meth:`set_maps`) and kept with the model.
    """

    def __init__(self, n_filters: int, box: int, kxy: torch.Tensor, weight: torch.Tensor, max_freq: float,
                 generator: torch.Generator, fixed: bool = False):
        super().__init__()
        self.n_filters, self.box, self.grid = int(n_filters), int(box), 2 * filter_radius(box, max_freq) + 3
        self.max_freq = float(max_freq)
        inside = kxy.norm(dim=-1) <= max_freq + 1e-9
        self.register_buffer("sel", torch.nonzero(inside).squeeze(1), persistent=False)
        self.register_buffer("kpx", kxy[inside] * box, persistent=False)
        w = weight[inside].float()
        self.register_buffer("w", w / w.sum().sqrt(), persistent=False)
        near = readable_voxels(self.grid)  # numbered compactly: the rest of the cube is never read, has no values
        compact = torch.full((self.grid ** 3,), -1, dtype=torch.long)
        compact[near] = torch.arange(int(near.sum()))
        self.register_buffer("compact", compact, persistent=False)
        self.n_voxels = int(near.sum())
        self.register_buffer("shell", self.voxel_radii().round().long(), persistent=False)  # each voxel's ring
        values = torch.randn((2 * self.n_voxels, self.n_filters), generator=generator)
        if fixed:
            self.register_buffer("values", values)
        else:
            self.values = nn.Parameter(values)

    def voxel_radii(self) -> torch.Tensor:
        """(n_voxels,) each readable voxel's distance from the grid's centre, pixels of the box's transform."""
        c = (torch.arange(self.grid) - self.grid // 2).float()
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        return (x**2 + y**2 + z**2).reshape(-1).sqrt()[self.compact.cpu() >= 0]

    @torch.no_grad()
    def set_maps(self, maps: torch.Tensor | np.ndarray) -> None:
        """Set the filters to the transforms of real-space maps (K, b, b, b) (z, y, x) of the same physical box
        (voxel d from the centre of the filters' grid is frequency d of the maps' transform), each scaled to unit
        RMS over the readable voxels (their sign and scale carry no meaning for the encoder)."""
        maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
        if maps.ndim != 4 or maps.shape[0] != self.n_filters or len(set(maps.shape[1:])) != 1:
            raise ValueError(f"{self.n_filters} cubic maps are needed, got an array of shape {tuple(maps.shape)}")
        b, g = maps.shape[-1], self.grid
        d = torch.arange(g) - g // 2
        ok = (d + b // 2 >= 0) & (d + b // 2 < b)  # frequencies beyond the maps' Nyquist stay zero
        idx = (d + b // 2).clamp(0, b - 1)
        near = self.compact >= 0
        for k, m in enumerate(maps):
            ft = fft3c(m.double())[idx][:, idx][:, :, idx] * (ok[:, None, None] & ok[None, :, None] & ok[None, None])
            v = ft.reshape(-1)[near.to(ft.device)]
            v = v / v.abs().pow(2).mean().sqrt().clamp_min(1e-30)
            self.values[:self.n_voxels, k] = v.real.to(self.values)
            self.values[self.n_voxels:, k] = v.imag.to(self.values)

    def taps(self, rot: torch.Tensor) -> Taps:
        """(index, weight, sign), each (B, M', 16): the compact voxels each read pixel spreads to at the poses
        ``rot`` (the trilinear corners of +p and −p, H(p) = (F(p) + conj F(−p)) / 2), their weights, and the
        imaginary part's sign; computed once, they serve several :meth:`adjoint` and :meth:`noise_gains` calls."""
        g = self.grid
        pos = plane_coords(self.kpx.to(rot.dtype), rot, 1).float()  # (B, M', 3) (x, y, z) from the centre
        corners = _CORNERS.to(pos.device)
        idx, wgt, sign = [], [], []
        for s in (1.0, -1.0):  # the imaginary part enters F(−p) negated
            p = s * pos + g // 2
            i0 = p.floor()
            t = p - i0
            c = i0.long()[..., None, :] + corners  # (B, M', 8, 3)
            tw = torch.where(corners.bool(), t[..., None, :], 1 - t[..., None, :]).prod(-1)  # (B, M', 8)
            idx.append(self.compact[(c[..., 2] * g + c[..., 1]) * g + c[..., 0]])
            wgt.append(tw)
            sign.append(torch.full_like(tw, s))
        return torch.cat(idx, -1), torch.cat(wgt, -1), torch.cat(sign, -1)

    def _pixel_scale(self, ctf: torch.Tensor) -> torch.Tensor:
        """(B, M') the factor of each read pixel's signal in the responses: CTF times the pixel's weight, halved."""
        return 0.5 * ctf[:, self.sel].float() * self.w

    @torch.no_grad()
    def adjoint(self, rot: torch.Tensor, ctf: torch.Tensor, signal: torch.Tensor, taps: Taps | None = None
                ) -> torch.Tensor:
        """(B, 2·n_voxels): each image's CTF-weighted signal spread onto the grid by the transpose of the Hermitian
        part's trilinear interpolation, so that ``adjoint(...) @ values`` is the responses (``taps``: :meth:`taps`
        of ``rot`` when already computed)."""
        nv = self.n_voxels
        idx, wgt, sign = self.taps(rot) if taps is None else taps
        coef = signal[:, self.sel].float() * self._pixel_scale(ctf)[..., None]  # (B, M', 2)
        rows = torch.arange(len(rot), device=idx.device)[:, None, None] * (2 * nv)
        out = torch.zeros(len(rot) * 2 * nv, device=idx.device)
        out.index_add_(0, (rows + idx).reshape(-1), (wgt * coef[..., :1]).reshape(-1))
        out.index_add_(0, (rows + nv + idx).reshape(-1), (wgt * sign * coef[..., 1:]).reshape(-1))
        return out.view(len(rot), 2 * nv)

    def rings(self) -> torch.Tensor:
        """(M',) the ring of the images' transform each read pixel lies on (its radius rounded to a pixel)."""
        return self.kpx.norm(dim=-1).round().long()

    @torch.no_grad()
    def noise_gains(self, rot: torch.Tensor, ctf: torch.Tensor, taps: Taps | None = None,
                    groups: torch.Tensor | None = None, n_groups: int = 1) -> torch.Tensor:
        """(n_groups, 2·RING_REACH + 1, n_voxels) G: Σ over each group's images and the read pixels of one ring of
        each tap's squared weight (trilinear weight times the pixel's factor), G[g, o, v] for the pixels on ring
        shell(v) + o − ``RING_REACH`` (shell(v): the voxel's radius rounded), so that :meth:`noise_diagonal` of G
        and σ²_r is the diagonal of Σ_{i in g} A_i N A_iᵀ for noise of variance σ²_r per real and per imaginary part
        on ring r (the taps of +p and −p that meet at one voxel, near the origin only, are counted apart; ``taps``
        as for :meth:`adjoint`; ``groups`` (B,) each image's group in [0, ``n_groups``), None: all in group 0).
        Its size does not grow with the number of rings."""
        nv, span = self.n_voxels, 2 * RING_REACH + 1
        idx, wgt, _ = self.taps(rot) if taps is None else taps
        offset = self.rings().to(idx.device)[None, :, None] - self.shell[idx] + RING_REACH
        tap = (wgt * self._pixel_scale(ctf)[..., None]).pow(2)  # (B, M', 16)
        slot = offset * nv + idx
        if groups is not None:
            slot = slot + (groups.to(idx.device) * (span * nv))[:, None, None]
        out = torch.zeros(n_groups * span * nv, device=idx.device)
        out.index_add_(0, slot.reshape(-1), tap.reshape(-1))
        return out.view(n_groups, span, nv)

    def noise_diagonal(self, gains: torch.Tensor, ring_var: torch.Tensor) -> torch.Tensor:
        """(..., n_voxels) Σ_r σ²_r G[..., r, v] from :meth:`noise_gains`' G (..., 2·RING_REACH + 1, n_voxels) by
        ring offset and ``ring_var`` (n_rings,) σ²_r (rings beyond it hold no read pixel)."""
        r = self.shell.to(gains.device)[None] + torch.arange(-RING_REACH, RING_REACH + 1, device=gains.device)[:, None]
        known = (r >= 0) & (r < len(ring_var))
        var = torch.where(known, ring_var.to(gains)[r.clamp(0, len(ring_var) - 1)], 0.0)
        return (var * gains).sum(-2)

    def forward(self, rot: torch.Tensor, ctf: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Responses (B, K) of the signals ``signal`` (B, M, 2) (real and imaginary parts, not phase-flipped) with
        ``ctf`` (B, M) at poses ``rot`` (B, 3, 3)."""
        return self.adjoint(rot, ctf, signal) @ self.values.float()
