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

    def __init__(self, box: int, pad: int = 2, device: torch.device | str = "cpu"):
        self.box, self.pad = box, pad
        self.pad_box = pad * box
        n = self.pad_box**3
        self.device = torch.device(device)
        self.data = torch.zeros(n, dtype=torch.complex128, device=self.device)
        self.weight = torch.zeros(n, dtype=torch.float64, device=self.device)
        r = centered_coords(box, self.device)
        self._inside = ((r[:, None] ** 2 + r[None, :] ** 2) <= (box // 2) ** 2).flatten()
        self.n_images = 0

    def insert(self, F: torch.Tensor, ctf: torch.Tensor | None, A: torch.Tensor) -> None:
        """Insert (B, box, box) centred transforms with their CTFs (or None) at orientations A (B, 3, 3)."""
        B = F.shape[0]
        F = F.to(self.device)
        ctf = torch.ones(F.shape, device=self.device) if ctf is None else ctf.to(self.device)
        pos = slice_coords(A.to(self.device, torch.float64), self.box, self.pad).reshape(B, -1, 3)
        pos = pos[:, self._inside] + self.pad_box // 2
        vals = (F * ctf).reshape(B, -1)[:, self._inside].to(torch.complex128)
        w2 = (ctf.to(torch.float64) ** 2).reshape(B, -1)[:, self._inside]
        base = torch.floor(pos)
        frac = pos - base
        base = base.long()
        P = self.pad_box
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    idx = base + torch.tensor([dx, dy, dz], device=self.device)
                    w = ((frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                         * (frac[..., 2] if dz else 1 - frac[..., 2]))
                    ok = ((idx >= 0) & (idx < P)).all(-1)
                    flat = (idx[..., 2] * P + idx[..., 1]) * P + idx[..., 0]
                    self.data.index_add_(0, flat[ok], (vals * w)[ok])
                    self.weight.index_add_(0, flat[ok], (w2 * w)[ok])
        self.n_images += B

    def add(self, other: BackProjector) -> None:
        """Merge another accumulator (e.g. the other half-set, or another rank)."""
        self.data += other.data
        self.weight += other.weight
        self.n_images += other.n_images

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
        floor = min_weight_fraction * self.weight[inside].mean().clamp_min(1e-30)
        lam = torch.as_tensor(regularisation, dtype=torch.float64, device=self.device)
        lam = lam[shells.clamp_max(len(lam) - 1)] if lam.ndim else lam
        lam = torch.clamp(lam, min=floor)
        ft = torch.where(inside, self.data / (self.weight + lam), torch.zeros_like(self.data))
        vol = ifft3c(ft.reshape((self.pad_box,) * 3)).real
        lo = self.pad_box // 2 - self.box // 2
        vol = vol[lo:lo + self.box, lo:lo + self.box, lo:lo + self.box]
        vol = vol / sinc2_grid(self.box, self.pad_box, self.device).double()
        if soft_edge_px > 0:
            vol = vol * sphere_mask(self.box, self.box / 2, soft_edge_px, self.device)
        return vol.to(torch.float32)
