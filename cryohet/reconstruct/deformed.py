"""Deformation-corrected reconstruction: the canonical map of a deformation model, from images of every
conformation, beside the homogeneous reconstruction of the same particles.

An image of conformation z is (CTF ×) the projection of the canonical map V0 with each canonical point x moved
to x + d(z, x). The adjoint of that forward model (splat the displaced voxels, project, CTF) backprojects each
CTF-weighted image along deformed rays: canonical voxel x receives the image's value at the projection of
x + d(z, x). The normal operator Σ P^T C² P is nearly the same with and without the deformations (locally a
deformation is a shift, which commutes with the CTF² weighting), so it is inverted as in the homogeneous
reconstruction: a first pass over the particles fills the homogeneous reconstruction's accumulators
(``geometry.backproject``: Σ CTF·F and the CTF² weights W on the padded Fourier grid); a second pass divides each
image's CTF-weighted transform by W + floor at its slice (a weighted backprojection: the sum of slices is then
nearly uniformly dense, so backprojecting it in real space gives the map with no 3-D deconvolution of the rays'
long tails), and backprojects it along deformed rays and, for calibration, along straight ones. Where few slices
cross a voxel (the lowest shells) the density differs from the padded grid's, so the straight-ray map's transfer
per shell against the homogeneous reconstruction of the same images (its unregularised half-map: correlation
0.998 and more per shell, tested) is measured and divided out. The half-maps' FSC then gives the Wiener filter
W / (W + λ), applied in Fourier space with ``reconstruct.homogeneous``'s λ. With zero displacements this is the
homogeneous reconstruction (tested). No iterative polish: each conjugate-gradient
step would cost two more passes over the particles (forward and adjoint), for a correction second order in the
deformation's gradient.

The real-space backprojection samples images bilinearly; the images are first divided by that interpolation's
transform (sinc² per axis), as ``geometry.splat`` divides by its spreading kernel's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.geometry.backproject import BackProjector
from cryohet.geometry.fourier import centered_coords, ifft2c
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.masks import sphere_mask
from cryohet.geometry.project import slice_coords
from cryohet.reconstruct.fsc import fsc
from cryohet.reconstruct.homogeneous import Reconstruction, backproject_batches, wiener_reconstruct

#: d(z (B, zdim), x_A (P, 3)) -> (B, P, 3) Å: a DeformationModel's ``displacement_field``
DisplacementField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: canonical voxels whose displacements are computed at once, per image of a batch
VOXEL_CHUNK = 16384
PAD = 2  # the homogeneous reconstruction's padding (BackProjector's default)


@dataclass
class DeformedReconstruction:
    corrected: Reconstruction     # the canonical map, deformations undone
    homogeneous: Reconstruction   # the same particles, deformations ignored


def memory_bytes(box: int, batch_size: int, voxel_chunk: int = VOXEL_CHUNK) -> int:
    """Peak bytes of ``reconstruct_deformed`` at ``box``: three padded accumulators (two half-sets and a copy;
    complex128 data, float64 weights) with one single-precision scratch pair, two float64 real-space sums, the
    canonical voxels' positions, 3-D transforms of a map, and a batch's images and displaced voxels (float32)."""
    P = PAD * box
    grid = P * P * (P // 2 + 1)
    grids = 3 * 24 * grid + 12 * grid
    maps = 2 * 8 * box**3 + 12 * box**3 + 4 * 16 * box**3
    batch = batch_size * (4 * 16 * box * box + 4 * 12 * min(voxel_chunk, box**3))
    return grids + maps + batch


def canonical_points(box: int, apix: float, device: torch.device | str) -> torch.Tensor:
    """Positions (box³, 3) Å (x, y, z) from the box centre of the voxels, in (z, y, x) order."""
    c = centered_coords(box, device)
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten(), zz.flatten()], 1) * apix


def slice_weights(bp: BackProjector, A: torch.Tensor) -> torch.Tensor:
    """The CTF² weights (B, box, box) of ``bp`` at the central-slice points of rotations ``A`` (B, 3, 3) (every
    pixel of the centred grid), by trilinear interpolation on its padded half grid (a point with kx < 0 read at
    its Friedel mate)."""
    P, H = bp.pad_box, bp.half_x
    pos = slice_coords(A.to(bp.device, torch.float32), bp.box, bp.pad)                  # (B, n, n, 3) (x, y, z)
    pos = torch.where(pos[..., :1] < 0, -pos, pos)
    grid = torch.stack([pos[..., 0] / (H - 1), (pos[..., 1] + P // 2) / (P - 1), (pos[..., 2] + P // 2) / (P - 1)],
                       -1) * 2 - 1
    w = bp.weight.to(torch.float32).reshape(1, 1, P, P, H)
    out = F.grid_sample(w, grid[None], mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(pos.shape[:-1])


def box_weights(bp: BackProjector) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, shells) on the box's centred rfft grid (box, box, box // 2 + 1), flattened: ``bp``'s CTF²
    weights at the box's frequencies (every pad-th voxel of its padded grid) and their shell indices."""
    n, pad, P, H = bp.box, bp.pad, bp.pad_box, bp.half_x
    k = centered_coords(n, bp.device).long() * pad + P // 2
    kx = torch.arange(n // 2 + 1, device=bp.device) * pad
    sel = (k[:, None, None] * (P * H) + k[None, :, None] * H + kx[None, None, :]).flatten()
    return bp.weight[sel], bp.shell_index()[sel]


class DeformedBackProjector:
    """Σ over images of the weighted image (CTF·F / (W + floor) at its slice, W a BackProjector's CTF² weights)
    read at the projection of every displaced canonical voxel."""

    def __init__(self, weights: BackProjector, apix: float, field: DisplacementField,
                 min_weight_fraction: float = 1e-3, voxel_chunk: int = VOXEL_CHUNK):
        self.bp, self.apix, self.field, self.chunk = weights, apix, field, voxel_chunk
        self.box, self.device = weights.box, weights.device
        n = self.box
        self.sum = torch.zeros(n**3, dtype=torch.float64, device=self.device)
        self.straight = torch.zeros_like(self.sum)  # the same images along undeformed rays (calibration)
        self.x_A = canonical_points(n, apix, self.device)
        w, shells = weights.weight, weights.shell_index()
        self.floor = float(min_weight_fraction * w[shells <= n // 2].mean().clamp_min(1e-30))
        c = centered_coords(n, self.device)
        s = torch.sinc(c / n) ** 2
        # the bilinear interpolation's transform, and nothing beyond Nyquist (it would alias in the 3-D grid)
        self._kernel = torch.where(c[:, None] ** 2 + c[None, :] ** 2 <= (n // 2) ** 2, s[:, None] * s[None, :],
                                   torch.inf)

    def insert(self, F_img: torch.Tensor, ctf: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> None:
        """Add (B, box, box) centred transforms (origins undone) with their CTFs at RELION rotations ``A``
        (B, 3, 3) and latents ``z`` (B, zdim)."""
        A = A.to(self.device, torch.float32)
        weighted = F_img.to(self.device) * ctf.to(self.device) / ((slice_weights(self.bp, A) + self.floor)
                                                                    * self._kernel)
        img = ifft2c(weighted).real.to(torch.float32)[:, None]
        z = z.to(self.device)
        for s in range(0, len(self.x_A), self.chunk):
            x = self.x_A[s:s + self.chunk]
            self.sum[s:s + self.chunk] += self._read(img, x + self.field(z, x).to(self.device, torch.float32), A)
            self.straight[s:s + self.chunk] += self._read(img, x, A)

    def _read(self, img: torch.Tensor, x_A: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, n, n) read bilinearly at the projections of points ``x_A`` ((p, 3) or (B, p, 3) Å),
        summed over the images -> (p,) float64."""
        n = self.box
        uv = x_A @ A[:, :2, :].transpose(1, 2) / self.apix                                  # (B, p, 2) px
        grid = (uv + n // 2) * (2.0 / (n - 1)) - 1.0                                         # align_corners=True
        vals = F.grid_sample(img, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return vals.sum(0).flatten().double()

    def raw_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfiltered canonical map and the straight-ray one (box, box, box): a sum's transform is box · pad³
        times the map's in the dense regime (a slice point's weight is spread over pad³ padded voxels per box
        voxel; the real-space sum along a voxel line is box times a slice's inverse transform)."""
        n, scale = self.box, self.box * self.bp.pad**3
        return tuple((v / scale).reshape(n, n, n).to(torch.float32) for v in (self.sum, self.straight))


def rfft_centred(vol: torch.Tensor) -> torch.Tensor:
    """Transform (box, box, box // 2 + 1) of a map, centred along z and y (``box_weights``' grid)."""
    return torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(vol.double())), dim=(0, 1))


def shell_transfer(estimate: torch.Tensor, reference: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """Per shell (0 .. box // 2), the regression coefficient of ``estimate``'s transform on ``reference``'s
    (Σ Re(E R*) / Σ |R|²); ``shells``: ``box_weights``' shell of each rfft voxel."""
    n = reference.shape[-1]
    e, r = rfft_centred(estimate).flatten(), rfft_centred(reference.to(estimate.device)).flatten()
    keep = shells <= n // 2
    num = torch.zeros(n // 2 + 1, dtype=torch.float64, device=e.device).index_add_(
        0, shells[keep], (e[keep] * r[keep].conj()).real)
    den = torch.zeros_like(num).index_add_(0, shells[keep], r[keep].abs() ** 2)
    return num / den.clamp_min(1e-30)


def wiener_filtered(raw: torch.Tensor, transfer: torch.Tensor, bp: BackProjector,
                    regularisation: torch.Tensor | float = 0.0, min_weight_fraction: float = 1e-3,
                    soft_edge_px: float = 3.0) -> torch.Tensor:
    """``raw`` (box, box, box) times W / (W + λ) / ``transfer`` (per shell) in Fourier space (W: ``bp``'s CTF²
    weights; λ per shell or a constant, at least ``min_weight_fraction`` of the mean weight within Nyquist, as
    ``BackProjector.reconstruct``), zero beyond Nyquist, then its soft spherical mask."""
    n = raw.shape[-1]
    w, shells = box_weights(bp)
    floor = min_weight_fraction * w[shells <= n // 2].mean().clamp_min(1e-30)
    lam = torch.as_tensor(regularisation, dtype=torch.float64, device=w.device)
    lam = lam[shells.clamp_max(len(lam) - 1)] if lam.ndim else torch.full_like(w, float(lam))
    inside = shells <= n // 2
    gain = w / (w + lam.clamp(min=floor)) / transfer[shells.clamp_max(n // 2)]
    ft = rfft_centred(raw.to(w.device)) * gain.masked_fill(~inside, 0).reshape(n, n, n // 2 + 1)
    vol = torch.fft.fftshift(torch.fft.irfftn(torch.fft.ifftshift(ft, dim=(0, 1)), s=(n, n, n)))
    if soft_edge_px > 0:
        vol = vol * sphere_mask(n, n / 2, soft_edge_px, w.device)
    return vol.to(torch.float32)


def reconstruct_deformed(pset, latents: np.ndarray, half: np.ndarray, field: DisplacementField, batch_size: int,
                         device: torch.device, box: int | None = None, wiener: str = "auto",
                         mask: torch.Tensor | None = None, voxel_chunk: int = VOXEL_CHUNK,
                         progress: Callable[[Iterable, str, int], Iterator] | None = None) -> DeformedReconstruction:
    """Corrected and homogeneous reconstructions (half-maps, full map, FSC) of the half-sets ``half`` (1 or 2
    per particle) of ``pset`` with latents ``latents`` (N, zdim) and the displacement ``field``: two passes
    over the particles in batches of ``batch_size``. ``box``, ``wiener`` and ``mask`` as
    ``homogeneous.reconstruct_halves``."""
    lattice = Lattice(pset.box, pset.apix).cropped(box or pset.box)
    n, apix = lattice.box, lattice.apix
    prep = ImagePreparer(pset, lattice, device=device)
    z = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    rows = []
    for h in (1, 2):
        idx = np.nonzero(half == h)[0]
        if len(idx) == 0:
            raise ValueError(f"half-set {h} is empty: at least two particles are needed")
        rows.append([idx[s:s + batch_size] for s in range(0, len(idx), batch_size)])

    def stream(h: int, what: str) -> Iterable[ImageBatch]:
        batches: Iterable[ImageBatch] = BatchStream(pset.reader(), rows[h], prep, prefetch=0)
        return progress(batches, f"{what} half-set {h + 1}", len(rows[h])) if progress is not None else batches

    bps = [backproject_batches(stream(h, "CTF² weights and homogeneous backprojection of"), n, device, PAD)
           for h in (0, 1)]
    raw, transfer = [], []
    shells = box_weights(bps[0])[1]
    for h in (0, 1):
        dbp = DeformedBackProjector(bps[h], apix, field, voxel_chunk=voxel_chunk)
        for b in stream(h, "deformed backprojection of"):
            dbp.insert(b.images_ft, b.ctf, b.rotations, z[torch.as_tensor(b.rows)])
        deformed, straight = dbp.raw_maps()
        raw.append(deformed)
        transfer.append(shell_transfer(straight, bps[h].reconstruct(0.0, soft_edge_px=0.0), shells))
    raw.append((raw[0] + raw[1]) / 2)
    transfer.append((transfer[0] + transfer[1]) / 2)
    halves, full, _ = wiener_reconstruct(
        [bps[0].copy(), bps[1]], wiener,
        reconstruct=lambda bp, which, lam: wiener_filtered(raw[which], transfer[which], bp, lam))
    corrected = _result(halves, full, mask, apix)
    halves, full, _ = wiener_reconstruct(bps, wiener)
    return DeformedReconstruction(corrected, _result(halves, full, mask, apix))


def _result(halves: list[torch.Tensor], full: torch.Tensor, mask: torch.Tensor | None, apix: float
            ) -> Reconstruction:
    masked = fsc(halves[0] * mask, halves[1] * mask) if mask is not None else None
    return Reconstruction(full, halves[0], halves[1], fsc(*halves), masked, apix)
