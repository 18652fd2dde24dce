"""CTF-weighted Fourier backprojection into a padded 3-D grid (trilinear insertion) and Wiener-style division.

The sums live on the Hermitian half of the padded grid (kx >= 0), as RELION keeps them: a map is real, so the
other half is the complex conjugate. Memory is then (pad·box)² × (pad·box / 2 + 1) voxels per accumulator.
"""
from __future__ import annotations

import torch

from cryohet.geometry.fourier import centered_coords
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import plane_coords, sinc2_grid

#: bytes per voxel of the padded half grid (P × P × (P/2 + 1)) that each accumulator holds: complex128 data,
#: float64 weight, its cached int64 shell indices
ACCUMULATOR_BYTES_PER_VOXEL = 16 + 8 + 8
#: and that one ``reconstruct`` adds for its temporaries: float64 then float32 denominators, the complex64
#: transform, the inverse FFT's work and its P³ float32 output (the total fitted to peaks measured on a CPU at
#: box 48-144, by the difference of two runs' peak resident memory)
RECONSTRUCT_BYTES_PER_VOXEL = 42


def reconstruction_bytes(box: int, pad: int = 2, pairs: int = 1) -> int:
    """Peak memory, bytes, of accumulating and reconstructing ``pairs`` pairs of half-sets at ``box`` (all
    accumulators alive at once, one reconstruction's temporaries at a time)."""
    P = pad * box
    per_voxel = 2 * pairs * ACCUMULATOR_BYTES_PER_VOXEL + RECONSTRUCT_BYTES_PER_VOXEL
    return per_voxel * P * P * (P // 2 + 1)


class BackProjector:
    """Accumulates Σ CTF·F (data) and Σ CTF² (weight) on the kx >= 0 half of a padded Fourier grid.

    Insert centred transforms of *centred* particle images (origins undone); ``reconstruct`` divides
    data by weight + regularisation, transforms back, crops and corrects for the trilinear kernel.
    The grid is indexed (kz, ky, kx) with kz, ky centred (index P // 2 is frequency 0) and kx = 0 .. P / 2.
    """

    #: images summed in single precision before they are added to the double-precision grids
    FLUSH_IMAGES = 2048

    def __init__(self, box: int, pad: int = 2, device: torch.device | str = "cpu"):
        self.box, self.pad = box, pad
        self.pad_box = P = pad * box
        self.half_x = H = P // 2 + 1
        self.shape = (P, P, H)
        self.device = torch.device(device)
        self._data = torch.zeros(P * P * H, dtype=torch.complex128, device=self.device)
        self._weight = torch.zeros(P * P * H, dtype=torch.float64, device=self.device)
        # single-precision scratch sums, flushed into the double-precision ones every FLUSH_IMAGES images
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._in_scratch = 0
        k = centered_coords(box, self.device)
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        self._plane = torch.stack([kx, ky], -1).reshape(-1, 2)
        self._k2 = (kx**2 + ky**2).flatten()
        self._half = (self._k2 <= (box // 2) ** 2) & (kx >= 0).flatten()
        self._step = torch.tensor([1, H, P * H], device=self.device)
        self._centre = torch.tensor([0, P // 2, P // 2], device=self.device, dtype=torch.float32)
        self._top = torch.tensor([H - 1, P - 1, P - 1], device=self.device, dtype=torch.float32) - 1e-3
        self.n_images = 0
        self._shells: torch.Tensor | None = None

    def insert(self, F: torch.Tensor, ctf: torch.Tensor | None, A: torch.Tensor,
               radius_px: float | None = None) -> None:
        """Insert (B, box, box) centred transforms with their CTFs (or None) at orientations A (B, 3, 3).
        ``radius_px``: only the samples within this radius (pixels of the box's Fourier grid) go in, at a cost
        that falls with their number (a map needed only to that resolution); None: all within Nyquist.

        Each sample of the image's kx >= 0 half goes in at its 3-D position p and, as its Friedel mate, at −p
        with the conjugate value; only corners with kx >= 0 are kept. Samples are sorted by grid index first
        (neighbouring writes then share cache lines, which halves the scatter's time on a CPU). Batches are
        scattered in single precision into scratch grids, added to the double-precision sums every
        ``FLUSH_IMAGES`` images (float32 keeps ~7 digits: enough for a few thousand images).
        """
        B = F.shape[0]
        ctf = torch.ones(F.shape, device=self.device) if ctf is None else ctf.to(self.device)
        keep = self._half if radius_px is None else self._half & (self._k2 <= radius_px**2)
        pos = plane_coords(self._plane[keep], A.to(self.device, torch.float32), self.pad).reshape(-1, 3)
        c = ctf.reshape(B, -1)[:, keep].to(torch.float32).flatten()
        data = F.to(self.device).reshape(B, -1)[:, keep].to(torch.complex64).flatten()
        # move every sample to kx >= 0 (its Friedel mate), then add the mates of those within one voxel of
        # kx = 0, whose trilinear corners reach back into kx >= 0
        flip = pos[:, 0] < 0
        pos = torch.where(flip[:, None], -pos, pos)
        data = torch.where(flip, data.conj(), data)
        near = torch.nonzero(pos[:, 0] < 1).squeeze(1)
        pos = torch.cat([pos, -pos[near]])
        data = torch.cat([data, data[near].conj()])
        c = torch.cat([c, c[near]])
        # grid positions; the rim at +Nyquist is pulled in so that all 8 corners exist
        pos = torch.minimum(pos + self._centre, self._top).clamp_(min=-1.0)
        base = torch.floor(pos)
        flat0, order = torch.sort((base.long() * self._step).sum(-1))
        base, frac = base[order], (pos - base)[order]
        data = data[order] * c[order]
        weight = c[order] ** 2
        w = (1 - frac, frac)  # trilinear weights per axis for corner offsets 0 and 1
        # a corner at kx = -1 (mates near kx = 0) is dropped: its weight is zeroed and it is moved to kx = 0,
        # where the sample's other x corner lies (x_step 0 instead of 1)
        below = base[:, 0] < 0
        w[0][:, 0] = torch.where(below, 0.0, w[0][:, 0])
        flat0 = torch.where(below, flat0 + 1, flat0)
        x_step = (~below).long()
        if self._scratch is None:
            n_vox = self._weight.numel()
            self._scratch = (torch.zeros(n_vox, dtype=torch.complex64, device=self.device),
                             torch.zeros(n_vox, dtype=torch.float32, device=self.device))
        scratch_d, scratch_w = self._scratch
        P, H = self.pad_box, self.half_x
        for dz in (0, 1):
            for dy in (0, 1):
                wyz = w[dy][:, 1] * w[dz][:, 2]
                for dx in (0, 1):
                    wc = w[dx][:, 0] * wyz
                    idx = flat0 + (dy * H + dz * P * H) + (x_step if dx else 0)
                    scratch_d.index_add_(0, idx, data * wc)
                    scratch_w.index_add_(0, idx, weight * wc)
        self._in_scratch += B
        if self._in_scratch >= self.FLUSH_IMAGES:
            self.flush(release=False)
        self.n_images += B

    def flush(self, release: bool = True) -> None:
        """Add the scratch sums to the double-precision grids; ``release`` frees the scratch (after the last
        insert; a later insert makes it again)."""
        if self._scratch is not None and self._in_scratch:
            self._data += self._scratch[0]
            self._weight += self._scratch[1]
            self._scratch[0].zero_()
            self._scratch[1].zero_()
            self._in_scratch = 0
        if release:
            self._scratch = None

    def copy(self) -> BackProjector:
        """A new accumulator holding the same sums (a snapshot that later inserts do not change)."""
        self.flush()
        out = BackProjector(self.box, self.pad, self.device)
        out._data.copy_(self._data)
        out._weight.copy_(self._weight)
        out.n_images = self.n_images
        return out

    def add(self, other: BackProjector) -> None:
        """Merge another accumulator (e.g. the other half-set, or another rank)."""
        self.flush()
        other.flush()
        self._data += other._data
        self._weight += other._weight
        self.n_images += other.n_images

    @property
    def weight(self) -> torch.Tensor:
        """Σ CTF² on the half grid (flattened, as ``shell_index``)."""
        self.flush()
        return self._weight

    def shell_index(self) -> torch.Tensor:
        """Radius of each half-grid voxel in units of the *unpadded* Fourier grid (rounded to shells); computed
        once per accumulator (a reconstruction with its regularisation asks for it several times)."""
        if self._shells is None:
            c = centered_coords(self.pad_box, self.device, torch.float64) / self.pad
            x = torch.arange(self.half_x, device=self.device, dtype=torch.float64) / self.pad
            r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + x[None, None, :] ** 2)
            self._shells = torch.round(r).long().flatten()
        return self._shells

    def _denominator(self, regularisation: torch.Tensor | float, min_weight_fraction: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """weight + λ per half-grid voxel (float64, λ at least the floor) and the voxels inside Nyquist."""
        shells = self.shell_index()
        inside = shells <= self.box // 2
        weight = self.weight
        floor = min_weight_fraction * weight[inside].mean().clamp_min(1e-30)
        lam = torch.as_tensor(regularisation, dtype=torch.float64, device=self.device)
        denom = lam[shells.clamp_max(len(lam) - 1)] if lam.ndim else torch.full_like(weight, float(lam))
        return denom.clamp_(min=floor).add_(weight), inside

    def wiener_gain(self, regularisation: torch.Tensor | float, min_weight_fraction: float = 1e-3) -> torch.Tensor:
        """Mean of weight / (weight + λ) per shell 0 .. box // 2 (float64): the average transfer of the
        regularised division (λ and its floor as ``reconstruct``)."""
        denom, inside = self._denominator(regularisation, min_weight_fraction)
        shells = self.shell_index()[inside]
        n = self.box // 2 + 1
        sums = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, shells,
                                                                                 self.weight[inside] / denom[inside])
        counts = torch.bincount(shells, minlength=n).to(torch.float64)
        return sums / counts.clamp_min(1)

    def reconstruct(self, regularisation: torch.Tensor | float = 0.0, min_weight_fraction: float = 1e-3,
                    soft_edge_px: float = 3.0, shell_gain: torch.Tensor | None = None) -> torch.Tensor:
        """Map (box, box, box): data / (weight + λ), with λ a constant or per shell (indexed by ``shell_index``).

        ``min_weight_fraction`` guards voxels with (almost) no data: λ is at least that fraction of the mean
        weight inside Nyquist. As relion_reconstruct, the map is zeroed outside a sphere of radius box / 2 with
        a cosine edge of ``soft_edge_px`` (0 disables the mask). ``shell_gain`` (per shell, e.g.
        :meth:`wiener_gain`): each shell is also divided by it, so that λ reweights voxels within a shell but
        leaves the shells' levels to the caller.
        """
        denom, inside = self._denominator(regularisation, min_weight_fraction)
        if shell_gain is not None:
            g = torch.as_tensor(shell_gain, dtype=torch.float64, device=self.device).clamp_min(1e-12)
            denom.mul_(g[self.shell_index().clamp_max(len(g) - 1)])
        denom = denom.to(torch.float32)
        # single precision from here (the map is float32); temporaries stay a few bytes per voxel
        ft = self._data.to(torch.complex64).div_(denom).masked_fill_(~inside, 0)
        del denom, inside
        P, n = self.pad_box, self.box
        # the half grid is centred along kz, ky: its inverse transform is the map times (-1)^(z + y); the
        # central box of the (fftshifted) map is at indices (i - n/2) mod P of the unshifted one
        vol = torch.fft.irfftn(ft.reshape(self.shape), s=(P, P, P), dim=(0, 1, 2))
        del ft
        idx = (torch.arange(n, device=self.device) - n // 2) % P
        h = n // 2  # idx is the indices P - h .. P - 1 then 0 .. h - 1: two slices per axis (10x a gather's speed)
        for d in range(3):
            vol = torch.cat([vol.narrow(d, P - h, h), vol.narrow(d, 0, n - h)], d)
        sign = 1.0 - 2.0 * (idx % 2).to(torch.float32)
        vol = vol * (sign[:, None, None] * sign[None, :, None]) / sinc2_grid(n, P, self.device)
        if soft_edge_px > 0:
            vol = vol * sphere_mask(n, n / 2, soft_edge_px, self.device)
        return vol.to(torch.float32)
