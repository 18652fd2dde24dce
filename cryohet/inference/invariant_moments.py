"""Rotation-invariant first, second and third moments of images in a steerable (polar Fourier) basis, debiased for
white noise and accumulated in one streaming pass (the data side of the method of moments with unknown poses).

Features: an image's half-plane transform y (real and imaginary parts at the working lattice's pixels inside the
resolution circle, ``ppca.ImageSource``) is taken to its band-limited image, sampled on a polar grid of integer
radii r = 0..R (cycles per working box) and L angles, and expanded in angular frequencies:
a(r, m) = (1/L) Σ_l P(r, θ_l) e^{−imθ_l}, |m| <= M_r = ⌈2π r ρ / n⌉ (ρ the particle's radius in pixels), so a = F y
with F complex (D, 2p). An in-plane rotation by α multiplies a(r, m) by e^{−imα}, so the in-plane averages of the
moments are the invariants

    m1[r]        = a(r, 0),
    m2[i, j]     = a_i conj(a_j),       m_i = m_j >= 0,  i <= j,
    m3[i, j, k]  = a_i a_j a_k,         m_i + m_j + m_k = 0,   i <= j <= k,

(the image being real, a(r, −m) = (−1)^m conj a(r, m): of a triple and the one with negated orders, only one is
kept)

kept for every image. With noise n ~ white (E|Y|² = σ² per transform pixel, ``moments.corner_noise_variance``),
E[n nᴴ] = F C Fᴴ and E[n nᵀ] = F C Fᵀ (C the diagonal covariance of y), so the debiased moments are
m2 − (F C Fᴴ)_ij and m3 − (μ_i P_jk + μ_j P_ik + μ_k P_ij), μ the first moment.

CTF: particles are split into defocus groups (quantiles of the mean defocus) with moments per group; images are
phase-flipped (transforms multiplied by sign c, which keeps the noise white) and the model of group g applies the
group's mean |c| at each pixel before F (exact when the group's |c| are equal; within a group the products of |c|
at different pixels are taken as products of their means).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from cryohet.geometry.fourier import centered_coords
from cryohet.geometry.lattice import Points


@dataclass
class InvariantMoments:
    """Debiased invariant moments (complex128, per defocus group: (G, T1), (G, T2), (G, T3)), each group's mean |c|
    at the half-plane pixels (G, p) and its number of images (G,)."""

    m1: torch.Tensor
    m2: torch.Tensor
    m3: torch.Tensor
    ctf: torch.Tensor
    counts: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.m1, self.m2, self.m3


def defocus_groups(mean_defocus_A: np.ndarray, n_groups: int) -> np.ndarray:
    """Group (0..G−1) of each particle: quantiles of its mean defocus (fewer groups when defoci repeat)."""
    edges = np.unique(np.quantile(mean_defocus_A, np.linspace(0, 1, n_groups + 1)[1:-1]))
    return np.searchsorted(edges, mean_defocus_A, side="right")


class SteerableFeatures:
    """The linear map F from half-plane transforms to angular Fourier coefficients a(r, m), and the index sets of
    the invariants. ``points``: the working lattice's half-plane pixels (DC included, weight 1); ``n``: the
    working box; ``particle_radius_px``: radius of the particle (sets each ring's angular bandwidth);
    ``max_order``: cap on |m|."""

    def __init__(self, points: Points, n: int, particle_radius_px: float, max_order: int = 24,
                 device: torch.device | str = "cpu"):
        device = torch.device(device)
        kxy = points.kxy.to(torch.float64)
        rr = torch.linalg.norm(kxy, dim=1) * n
        self.n_rings = int(math.floor(float(rr.max()) + 1e-6)) + 1                 # radii 0..R
        orders = [0] + [min(max_order, math.ceil(2 * math.pi * r * particle_radius_px / n))
                        for r in range(1, self.n_rings)]
        L = 4 * max(orders) + 4
        theta = torch.arange(L, dtype=torch.float64) * (2 * math.pi / L)
        # image pixels (centred) -> polar samples: P(q) = Σ_x img(x) e^{−2πi q·x}
        c = centered_coords(n, dtype=torch.float64)
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)                          # (n², 2)
        # half-plane transform (Re, Im) -> image: img = (1/n²) Σ_p w_p (Re Y_p cos 2πk_p·x − Im Y_p sin 2πk_p·x)
        ph = 2 * math.pi * (x @ kxy.T)                                               # (n², p)
        w = points.weight.to(torch.float64)
        to_image = torch.cat([torch.cos(ph) * w, -torch.sin(ph) * w], 1) / n ** 2    # (n², 2p)
        rows, ring, order = [], [], []
        for r in range(self.n_rings):
            q = (r / n) * torch.stack([torch.cos(theta), torch.sin(theta)], 1)        # (L, 2) cycles/px
            polar = torch.exp(-2j * math.pi * (q @ x.T)) @ to_image.to(torch.complex128)   # (L, 2p)
            for m in range(-orders[r], orders[r] + 1):
                rows.append((torch.exp(-1j * m * theta) @ polar) / L)
                ring.append(r)
                order.append(m)
        self.F = torch.stack(rows).to(device)                                        # (D, 2p) complex128
        self.ring = torch.tensor(ring, device=device)
        self.order = torch.tensor(order, device=device)
        self.is_dc = points.weight.to(device) == 1
        D = len(ring)
        self.i1 = torch.nonzero(self.order == 0).squeeze(1)
        i, j = torch.triu_indices(D, D, device=device)
        same = (self.order[i] == self.order[j]) & (self.order[i] >= 0)   # m < 0: conjugates of m > 0 (real image)
        self.i2 = torch.stack([i[same], j[same]])                                    # (2, T2)
        # triples i <= j <= k with m_i + m_j + m_k = 0: k among the features of order −m_i − m_j, k >= j
        need = -(self.order[i] + self.order[j])
        trip = []
        for kk in range(D):
            hit = (need == self.order[kk]) & (j <= kk)
            trip.append(torch.stack([i[hit], j[hit], torch.full_like(i[hit], kk)]))
        i3 = torch.cat(trip, 1)
        # a(r, −m) = (−1)^m conj a(r, m): a triple and the one with negated orders are conjugates; keep one
        key = [sorted(zip(ring_t, order_t)) for ring_t, order_t in zip(self.ring[i3].T.tolist(),
                                                                         self.order[i3].T.tolist(), strict=True)]
        keep = [k >= sorted((r, -m) for r, m in k) for k in key]
        self.i3 = i3[:, torch.tensor(keep, device=device)]                           # (3, T3)

    def __len__(self) -> int:
        return len(self.ring)

    def sizes(self) -> tuple[int, int, int]:
        return len(self.i1), self.i2.shape[1], self.i3.shape[1]

    def max_ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Largest ring among each invariant's features (for frequency marching)."""
        r = self.ring
        return r[self.i1], torch.maximum(r[self.i2[0]], r[self.i2[1]]), r[self.i3].max(0).values

    def coefficients(self, y: torch.Tensor) -> torch.Tensor:
        """a (B, D) complex128 from half-plane transforms stacked as real (B, 2p)."""
        return y.to(torch.float64).to(torch.complex128) @ self.F.T

    def invariants(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image (..., D) -> the invariants (..., T1), (..., T2), (..., T3)."""
        i2, i3 = self.i2, self.i3
        return (a[..., self.i1], a[..., i2[0]] * a[..., i2[1]].conj(),
                a[..., i3[0]] * a[..., i3[1]] * a[..., i3[2]])

    def noise(self, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """E[n nᴴ] and E[n nᵀ] (D, D) of the features of white noise with E|Y|² = ``sigma2`` per pixel."""
        var = torch.where(self.is_dc, 1.0, 0.5).to(torch.float64) * sigma2
        var = torch.cat([var, torch.where(self.is_dc, 0.0, var)])
        FC = self.F * var
        return FC @ self.F.conj().T, FC @ self.F.T


class MomentAccumulator:
    """Streaming sums of the invariants and of |c| per defocus group (float64/complex128, memory independent of
    the number of images)."""

    def __init__(self, feats: SteerableFeatures, n_groups: int):
        self.feats = feats
        dev = feats.F.device
        self.s = [torch.zeros((n_groups, T), dtype=torch.complex128, device=dev) for T in feats.sizes()]
        self.ctf = torch.zeros((n_groups, feats.F.shape[1] // 2), dtype=torch.float64, device=dev)
        self.counts = torch.zeros(n_groups, dtype=torch.float64, device=dev)

    def restore(self, sums: list[torch.Tensor], ctf: torch.Tensor, counts: torch.Tensor) -> None:
        """Go on from the sums of an interrupted pass (a checkpoint's)."""
        dev = self.counts.device
        self.s = [s.to(dev) for s in sums]
        self.ctf, self.counts = ctf.to(dev), counts.to(dev)

    def add(self, y: torch.Tensor, ctf: torch.Tensor, group: torch.Tensor) -> None:
        """A batch: half-plane transforms ``y`` (B, p) complex, their CTFs (B, p) and defocus groups (B,)."""
        group = group.to(self.counts.device)
        yf = y * torch.where(ctf < 0, -1.0, 1.0).to(ctf.dtype)                   # phase flip
        a = self.feats.coefficients(torch.cat([yf.real, yf.imag], 1))
        for s, inv in zip(self.s, self.feats.invariants(a), strict=True):
            s.index_add_(0, group, inv)
        self.ctf.index_add_(0, group, ctf.abs().to(torch.float64))
        self.counts.index_add_(0, group, torch.ones(len(y), dtype=torch.float64, device=group.device))

    def result(self, sigma2: float) -> InvariantMoments:
        """Means per group, debiased for white noise of variance ``sigma2`` (E|Y|² per transform pixel)."""
        f = self.feats
        keep = self.counts > 0
        cnt = self.counts[keep][:, None]
        m1, m2, m3 = (s[keep] / cnt for s in self.s)
        C, P = f.noise(sigma2)
        m2 = m2 - C[f.i2[0], f.i2[1]]
        mu = torch.zeros((len(m1), len(f)), dtype=torch.complex128, device=m1.device)
        mu[:, f.i1] = m1
        i, j, k = f.i3
        m3 = m3 - (mu[:, i] * P[j, k] + mu[:, j] * P[i, k] + mu[:, k] * P[i, j])
        return InvariantMoments(m1, m2, m3, self.ctf[keep] / cnt, self.counts[keep])


def accumulate(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], feats: SteerableFeatures,
               sigma2: float, n_groups: int) -> InvariantMoments:
    """One streaming pass over (transforms, CTF, defocus group) batches -> debiased invariant moments."""
    acc = MomentAccumulator(feats, n_groups)
    for y, ctf, group in batches:
        acc.add(y, ctf, group)
    return acc.result(sigma2)
