"""The pose-aware encoder's filters from the particles' covariance (``train-vae --filters_from covariance``).

Each image's residual (the image less the homogeneous map's CTF-weighted slice at its pose) is spread onto the
filters' Fourier grid by the filter bank's adjoint (a CTF-weighted back-projection, b_i), and the filters are the
leading eigenvectors of Σ̂ = S (Σ_i b_i b_iᵀ) S, S = 1 / (D + f·D̄ + τ), D = Σ_i of the back-projected CTF² per
voxel: the outer products of the back-projections, each voxel divided by how much of the data reaches it. Two
terms, each constant over a Fourier shell, keep that division from amplifying noise:
- the floor f·D̄ (f = ``DENSITY_FLOOR``, D̄ the shell's mean density) keeps voxels that few views reach
  (preferred orientations, a missing cone) from being amplified until their noise makes the leading eigenvectors;
- the Wiener term τ (the shell's noise over its conformational variance per unit density, both estimated in the
  first pass) weights down the shells where the conformations' signal is below the noise, which at low SNR would
  otherwise lead, since 1 / D amplifies the noise of the outer shells that fewer images' CTF² reach. The variance
  is the shell's power above the noise's less ``NOISE_MARGIN`` standard errors of it (from ``SPLITS`` groups of
  the particles), so that a shell of noise alone is not read as signal by chance.
With uniform views and signal above the noise both are small beside D and S is 1 / D up to a constant. Σ̂ is a
one-pass stand-in for the covariance of the conformations that ``moments`` and ``principal-volumes`` solve for;
its eigenvectors, held fixed, give the encoder the directions in which the particles differ, which at low SNR the
learnt filters do not find. The eigenvectors are found by subspace iteration, each step one streamed pass over
a random subset of at most ``COVARIANCE_PARTICLES`` particles, so neither time nor memory grows beyond it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from cryohet.inference.pose_filters import RING_REACH, PoseFilterBank, Taps

#: the most particles the covariance is estimated from
COVARIANCE_PARTICLES = 10_000
#: passes over them (subspace iteration steps)
POWER_PASSES = 5
#: extra vectors iterated beside the K wanted (oversampling)
OVERSAMPLE = 8
#: the density's floor f, as a fraction of its mean over each Fourier shell (S = 1 / (D + f·D̄ + τ))
DENSITY_FLOOR = 1.0
#: the Wiener term τ's weight (0: none)
WIENER = 1.0
#: the Wiener term's cap, as a multiple of the shell's mean density (a shell whose variance is all noise)
MAX_DOWNWEIGHT = 1e6
#: groups of the particles (by row) whose spread gives the standard error of each shell's power above the noise
SPLITS = 8
#: standard errors taken off each shell's power above the noise before it counts as the conformations' variance
NOISE_MARGIN = 2.0

Signals = Iterable[tuple[torch.Tensor, ...]]


@torch.no_grad()
def covariance_filters(bank: PoseFilterBank, signals: Callable[[], Signals], n_filters: int,
                       reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, seed: int = 0,
                       passes: int = POWER_PASSES) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The filters: (2·n_voxels, ``n_filters``) the leading eigenvectors of the weighted covariance of the
    back-projected signals, as the bank's ``values`` (real parts, then imaginary parts), inside the bank's
    resolution circle, each of unit RMS and with its largest real part positive (the sign is arbitrary); the
    per-voxel SNR of the conformations' variance in each Fourier shell inside the resolution circle, shell r at r
    voxels from the centre; and the leading direction's reproducibility (:func:`split_reproducibility`).

    ``signals()``: one pass over the particles, (rotations (B, 3, 3), CTF (B, M), residual (B, M, 2)[, rows (B,)])
    per batch, rows the particles' indices (which set their groups: give them where the ranks share a pass, else the
    order of the stream is used); ``reduce``: sums a tensor over the ranks that share the passes (each streams its
    own particles). The first pass also sums the density and the noise's and signal's shares, so the iteration
    proper starts with the second (``passes`` ≥ 2)."""
    if passes < 2:
        raise ValueError(f"passes must be at least 2, got {passes}")
    nv = bank.n_voxels
    device = bank.values.device
    inside = (bank.voxel_radii() <= bank.max_freq * bank.box + 1e-6).to(device)
    width = min(2 * int(inside.sum()), n_filters + OVERSAMPLE)
    if not 1 <= n_filters <= width:
        raise ValueError(f"{n_filters} filters asked for, the resolution circle holds {int(inside.sum())} voxels")
    q = torch.randn(2 * nv, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    scale = None
    for step in range(passes):
        y = torch.zeros(2, 2 * nv, width, dtype=torch.float64, device=device)  # the two halves of the particles
        stats = _FirstPass(bank) if scale is None else None
        probe = q if scale is None else scale[:, None] * q
        seen = 0
        for rot, ctf, residual, *given in signals():
            rows = (given[0] if given else torch.arange(seen, seen + len(rot))).to(device).long()
            seen += len(rot)
            taps = bank.taps(rot)
            b = bank.adjoint(rot, ctf, residual, taps)
            odd = (rows % 2)[:, None]
            bp = b @ probe.float()  # each half's sum by masks, not by indexing (no host sync on a GPU)
            y += (b.T @ torch.cat([bp * (1 - odd), bp * odd], 1)).double().view(2 * nv, 2, width).transpose(0, 1)
            if stats is not None:
                stats.add(rot, ctf, residual, b, taps, rows)
        y = reduce(y)
        if stats is not None:
            scale, shell_snr = stats.weights(inside, reduce)
            scale = scale.repeat(2)
        y = scale[:, None] * y
        if step == passes - 1:
            halves = q.T @ y  # (2, width, width) each half's covariance in the subspace
            reproducibility = split_reproducibility(halves[0], halves[1])
            values, vectors = torch.linalg.eigh(halves.sum(0))  # Rayleigh–Ritz in the last subspace
            u = q @ vectors[:, values.argsort(descending=True)[:n_filters]]
        else:
            q = torch.linalg.qr(y.sum(0)).Q
    u = u * inside.repeat(2)[:, None]  # the QR's rounding leaves ~1e-15 where the rows were zero
    u = u / u.pow(2).mean(0).sqrt().clamp_min(1e-30)
    real = u[:nv]  # F(k) and F(−k) have equal real parts, so a tie of magnitudes there is no tie of signs
    sign = torch.sign(real.gather(0, real.abs().argmax(0, keepdim=True)))
    return (u * sign).float(), shell_snr[:round(bank.max_freq * bank.box) + 1].float(), reproducibility


def split_reproducibility(first: torch.Tensor, second: torch.Tensor) -> float:
    """How far the leading direction of the variance is the particles' and not their noise's, in standard
    deviations: the leading eigenvector v of one half's covariance (``first``, (w, w) in the iterated subspace)
    against the other half's (``second``, B): (vᵀBv − tr B / w) / s, s² = 2 tr(B̃²) / (w (w + 2)) the variance of
    uᵀBu over unit vectors u drawn uniformly (B̃ = B − (tr B / w) I); the mean of both ways round. A direction of one
    half's noise is no direction of the other's, so noise alone gives about 0; a change of the particles that the
    filters can read, many."""
    out = []
    for a, b in ((first, second), (second, first)):
        w = len(b)
        lead = torch.linalg.eigh(a).eigenvectors[:, -1]
        mean = float(torch.trace(b)) / w
        spread = b - mean * torch.eye(w, dtype=b.dtype, device=b.device)
        sd = (2 * float((spread * spread).sum()) / (w * (w + 2))) ** 0.5
        out.append((float(lead @ b @ lead) - mean) / max(sd, 1e-300))
    return sum(out) / 2


class _FirstPass:
    """The first pass's sums over the particles, from which the voxels' weights are set (:meth:`weights`)."""

    def __init__(self, bank: PoseFilterBank):
        self.bank = bank
        nv, device = bank.n_voxels, bank.values.device
        self.density = torch.zeros(nv, dtype=torch.float64, device=device)    # D = Σ_i d_i
        self.density2 = torch.zeros(nv, dtype=torch.float64, device=device)   # Σ_i d_i²
        # Σ_i b_i², the covariance's diagonal, and the taps' squares by ring offset, each over each group's particles
        self.power = torch.zeros(SPLITS, 2 * nv, dtype=torch.float64, device=device)
        self.ring = bank.rings().to(device)  # each read pixel's ring of the images' transform
        rings = int(self.ring.max()) + 1
        self.gains = torch.zeros(SPLITS, 2 * RING_REACH + 1, nv, dtype=torch.float64, device=device)
        self.ring_power = torch.zeros(rings, dtype=torch.float64, device=device)  # Σ_i |r_i|² per ring, per part
        self.ring_count = torch.zeros(rings, dtype=torch.float64, device=device)

    def add(self, rot: torch.Tensor, ctf: torch.Tensor, residual: torch.Tensor, b: torch.Tensor, taps: Taps,
            rows: torch.Tensor) -> None:
        """One batch: its poses (B, 3, 3), CTF (B, M), residuals (B, M, 2), their back-projections b
        (B, 2·n_voxels), the bank's taps at those poses and the particles' rows (B,) (long, on the sums' device)."""
        bank = self.bank
        groups = rows % SPLITS
        d = bank.adjoint(rot, ctf, torch.stack([ctf, torch.zeros_like(ctf)], -1), taps)[:, :bank.n_voxels]
        self.density += d.double().sum(0)
        self.density2 += d.double().pow(2).sum(0)
        self.power.index_add_(0, groups, b.double().pow(2))
        self.gains += bank.noise_gains(rot, ctf, taps, groups, SPLITS).double()
        self.ring_power.index_add_(0, self.ring, residual[:, bank.sel].double().pow(2).mean(-1).sum(0))
        self.ring_count.index_add_(0, self.ring, torch.full_like(self.ring, len(residual), dtype=torch.float64))

    def weights(self, inside: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S (n_voxels,), the per-voxel SNR of the conformations' variance in each Fourier shell (n_shells,)).

        S = 1 / (D + f·D̄ + τ) inside the resolution circle, 0 outside it, with D̄ and τ constant over each shell:
        D̄ the shell's mean density, τ = n̄ / c̄ the Wiener term of the covariance's estimate, where
        n̄ = Σ N / Σ D over the shell (N the diagonal of Σ_i A_i N_i A_iᵀ, the noise's share of Σ_i b_i², from the
        residuals' power per ring, which at low SNR is the noise's) and c̄ = E⁺ / Σ Σ_i d_i², the diagonal of the
        conformations' covariance itself: E⁺ = max(E − ``NOISE_MARGIN``·se(E), 0), E = Σ (Σ_i b_i² − N) the
        shell's power above the noise, se(E) its standard error from the spread of E over ``SPLITS`` groups of the
        particles. Where the data hold less of that variance than of the noise (the shell's SNR D̄ / τ below 1), the
        shell is weighted down, where 1 / D would let its noise lead."""
        bank, nv = self.bank, self.bank.n_voxels
        density, density2 = reduce(self.density).abs(), reduce(self.density2)
        ring_var = reduce(self.ring_power) / reduce(self.ring_count).clamp_min(1)
        noise = bank.noise_diagonal(reduce(self.gains), ring_var)  # (SPLITS, n_voxels)
        power = reduce(self.power)
        shell = bank.shell.to(density.device)
        n_shells = int(shell.max()) + 1

        def total(values: torch.Tensor) -> torch.Tensor:  # (..., n_shells) the sums over each shell inside the circle
            return torch.zeros(*values.shape[:-1], n_shells, dtype=values.dtype, device=values.device).index_add_(
                -1, shell[inside], values[..., inside])

        tiny = 1e-6 * float(density.max())
        mean_density = total(density) / torch.bincount(shell[inside], minlength=n_shells).clamp_min(1)
        excess = total((power[:, :nv] + power[:, nv:]) / 2 - noise)  # (SPLITS, n_shells)
        se = (SPLITS / (SPLITS - 1) * (excess - excess.mean(0)).pow(2).sum(0)).sqrt()
        signal = (excess.sum(0) - NOISE_MARGIN * se).clamp_min(0) / total(density2).clamp_min(1e-30)
        tau = total(noise.sum(0)) / total(density).clamp_min(tiny) / signal.clamp_min(1e-300)
        tau = torch.minimum(tau, MAX_DOWNWEIGHT * mean_density)  # a shell without variance: weighted down, not out
        weights = 1.0 / (density + (DENSITY_FLOOR * mean_density + WIENER * tau)[shell]).clamp_min(tiny)
        return torch.where(inside, weights, 0.0), mean_density / tau.clamp_min(1e-300)


def signal_extent(shell_snr: torch.Tensor, box_A: float) -> str:
    """In words, to what resolution the conformations' variance is above the noise (``shell_snr`` from
    :func:`covariance_filters`, ``box_A`` the box's side in Å)."""
    above = torch.nonzero(shell_snr[1:] >= 1).squeeze(1) + 1
    if not len(above):
        return "the conformations' variance is below the noise in every Fourier shell (all weighted down)"
    return (f"the conformations' variance is above the noise to {box_A / int(above.max()):.1f} Å "
            f"(shells where it is below, weighted down: {int((shell_snr[1:] < 1).sum())} of {len(shell_snr) - 1})")
