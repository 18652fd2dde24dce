"""CTF-weighted Fourier backprojection into a padded 3-D grid (trilinear insertion) and Wiener-style division."""
from __future__ import annotations

import torch

from cryohet.geometry.fourier import centered_coords, ifft3c
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import sinc2_grid, slice_coords


class BackProjector:
    """Accumulates Σ CTF·F (data) and Σ CTF² (weight) on a padded Fourier grid.

    Insert centred transforms of *centred* particle images (origins undone); ``reconstruct`` divides
    data by weight + regularisation, transforms back, crops and corrects for the trilinear kernel.
    """

    #: images summed in single precision before they are added to the double-precision grids
    FLUSH_IMAGES = 2048

    def __init__(self, box: int, pad: int = 2, device: torch.device | str = "cpu"):
        self.box, self.pad = box, pad
        self.pad_box = pad * box
        self.device = torch.device(device)
        # Σ CTF·F and Σ CTF² over the inserted Hermitian half; the other half is mirrored on use
        self._data = torch.zeros(self.pad_box**3, dtype=torch.complex128, device=self.device)
        self._weight = torch.zeros(self.pad_box**3, dtype=torch.float64, device=self.device)
        # single-precision scratch sums, flushed into the double-precision ones every FLUSH_IMAGES images
        self._scratch_d = torch.zeros(self.pad_box**3, dtype=torch.complex64, device=self.device)
        self._scratch_w = torch.zeros(self.pad_box**3, dtype=torch.float32, device=self.device)
        self._in_scratch = 0
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None
        k = centered_coords(box, self.device)
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        self._half = ((kx**2 + ky**2 <= (box // 2) ** 2) & (kx >= 0)).flatten()
        self._step = torch.tensor([1, self.pad_box, self.pad_box**2], device=self.device)
        self.n_images = 0

    def insert(self, F: torch.Tensor, ctf: torch.Tensor | None, A: torch.Tensor) -> None:
        """Insert (B, box, box) centred transforms with their CTFs (or None) at orientations A (B, 3, 3).

        Batches are scattered in single precision into scratch grids, which are added to the double-precision
        sums every ``FLUSH_IMAGES`` images (float32 keeps ~7 digits: enough for a few thousand images).
        The samples are sorted by grid index first: neighbouring writes then hit the same cache lines, which
        halves the time of the scatter on a CPU.
        """
        B = F.shape[0]
        P = self.pad_box
        ctf = torch.ones(F.shape, device=self.device) if ctf is None else ctf.to(self.device)
        pos = slice_coords(A.to(self.device, torch.float32), self.box, self.pad).reshape(B, -1, 3)
        # positions span [0, P]; the last half-pixel rim at +Nyquist is pulled in so all 8 corners exist
        pos = (pos[:, self._half] + P // 2).clamp_(0, P - 1 - 1e-3).reshape(-1, 3)
        base = torch.floor(pos)
        flat0, order = torch.sort((base.long() * self._step).sum(-1))
        frac = (pos - base)[order]
        c = ctf.reshape(B, -1)[:, self._half].to(torch.float32).flatten()[order]
        data = F.to(self.device).reshape(B, -1)[:, self._half].to(torch.complex64).flatten()[order] * c
        weight = c * c
        w = (1 - frac, frac)  # trilinear weights per axis for corner offsets 0 and 1
        scratch_d, scratch_w = self._scratch_d, self._scratch_w
        for dz in (0, 1):
            for dy in (0, 1):
                wyz = w[dy][..., 1] * w[dz][..., 2]
                for dx in (0, 1):
                    wc = w[dx][..., 0] * wyz
                    idx = flat0 + (dx + dy * P + dz * P * P)
                    scratch_d.index_add_(0, idx, data * wc)
                    scratch_w.index_add_(0, idx, weight * wc)
        self._in_scratch += B
        if self._in_scratch >= self.FLUSH_IMAGES:
            self._flush()
        self._full = None
        self.n_images += B

    def _flush(self) -> None:
        if self._in_scratch:
            self._data += self._scratch_d
            self._weight += self._scratch_w
            self._scratch_d.zero_()
            self._scratch_w.zero_()
            self._in_scratch = 0

    def add(self, other: BackProjector) -> None:
        """Merge another accumulator (e.g. the other half-set, or another rank)."""
        self._flush()
        other._flush()
        self._data += other._data
        self._weight += other._weight
        self._full = None
        self.n_images += other.n_images

    def _mirrored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-grid data (complex) and weight: the inserted half plus its Friedel mate (cached)."""
        if self._full is None:
            self._flush()
            P = self.pad_box

            def mate(x: torch.Tensor) -> torch.Tensor:
                return torch.roll(torch.flip(x.reshape(P, P, P), (0, 1, 2)), (1, 1, 1), (0, 1, 2)).flatten()

            self._full = (self._data + mate(self._data).conj(), self._weight + mate(self._weight))
        return self._full

    @property
    def weight(self) -> torch.Tensor:
        return self._mirrored()[1]

    def shell_index(self) -> torch.Tensor:
        """Radius of each padded-grid voxel in units of the *unpadded* Fourier grid (rounded to shells)."""
        c = centered_coords(self.pad_box, self.device, torch.float64) / self.pad
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        return torch.round(r).long().flatten()

    def reconstruct(self, regularisation: torch.Tensor | float = 0.0, min_weight_fraction: float = 1e-3,
                    soft_edge_px: float = 3.0) -> torch.Tensor:
        """Map (box, box, box): data / (weight + λ), with λ a constant or per shell (indexed by ``shell_index``).

        ``min_weight_fraction`` guards voxels with (almost) no data: λ is at least that fraction of the mean
        weight inside Nyquist. As relion_reconstruct, the map is zeroed outside a sphere of radius box / 2 with
        a cosine edge of ``soft_edge_px`` (0 disables the mask).
        """
        shells = self.shell_index()
        inside = shells <= self.box // 2
        data, weight = self._mirrored()
        floor = min_weight_fraction * weight[inside].mean().clamp_min(1e-30)
        lam = torch.as_tensor(regularisation, dtype=torch.float64, device=self.device)
        lam = lam[shells.clamp_max(len(lam) - 1)] if lam.ndim else lam
        lam = torch.clamp(lam, min=floor)
        ft = torch.where(inside, data / (weight + lam), torch.zeros_like(data))
        vol = ifft3c(ft.reshape((self.pad_box,) * 3)).real
        lo = self.pad_box // 2 - self.box // 2
        vol = vol[lo:lo + self.box, lo:lo + self.box, lo:lo + self.box]
        vol = vol / sinc2_grid(self.box, self.pad_box, self.device).double()
        if soft_edge_px > 0:
            vol = vol * sphere_mask(self.box, self.box / 2, soft_edge_px, self.device)
        return vol.to(torch.float32)
