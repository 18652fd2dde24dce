"""Deformation-corrected reconstruction: the canonical map of a deformation model, from images of every
conformation, beside the homogeneous reconstruction of the same particles.

An image of conformation z is (CTF ×) the projection of the canonical map V0 with each canonical point x moved
to x + d(z, x). The adjoint of that forward model (splat the displaced voxels, project, CTF) backprojects each
CTF-weighted image along deformed rays: canonical voxel x receives the image's value at the projection of
x + d(z, x). The normal operator Σ P^T C² P is nearly the same with and without the deformations (locally a
deformation is a shift, which commutes with the CTF² weighting), so it is inverted as in the homogeneous
reconstruction, whose pieces are reused:

1. pass 1 fills the homogeneous reconstruction's accumulators (``geometry.backproject``: Σ CTF·F and the CTF²
   weights W of each half-set on the padded Fourier grid) and makes the homogeneous half-maps, full map, FSC and
   Wiener λ (``reconstruct.homogeneous``);
2. pass 2 weights each image's transform at its slice by CTF / (W + λ) (a weighted backprojection: the sum of
   slices is then nearly uniformly dense and already Wiener-filtered, so backprojecting it in real space gives
   the map without a 3-D deconvolution of the rays' long tails) and backprojects it along deformed rays, once
   with its half-set's W and λ (the half-map) and once with both half-sets' (the full map);
3. the real-space operator's transfer differs from the Fourier reconstruction's where few slices cross a voxel,
   so it is measured without noise: the homogeneous map, projected at each particle's pose with its CTF, goes
   through the same weighting and straight-ray backprojection, and is regressed per shell on what the Fourier
   reconstruction makes of it (the map × W / (W + λ)); the corrected maps are divided by that transfer.

With zero displacements this is the homogeneous reconstruction (tested). The corrected maps use the homogeneous
reconstruction's λ (its SSNR is the lower one, so their filter errs on the safe side). No iterative polish: each
conjugate-gradient step would cost two more passes over the particles (forward and adjoint), for a correction
second order in the deformation's gradient. Real-space reads are bilinear; images are first divided by that
interpolation's transform (sinc² per axis, as ``geometry.splat`` divides by its spreading kernel's) and cut at
Nyquist (beyond it they would alias in the 3-D grid).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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
from cryohet.geometry.project import Projector, slice_coords
from cryohet.reconstruct.fsc import fsc
from cryohet.reconstruct.homogeneous import Reconstruction, backproject_batches, wiener_lambda, wiener_reconstruct

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
    complex128 data, float64 weights) with one single-precision scratch pair, the reference map's padded transform
    (complex64), two float64 real-space sums, the canonical voxels' positions, 3-D transforms of a map, and a
    batch's images and displaced voxels (float32)."""
    P = PAD * box
    grid = P * P * (P // 2 + 1)
    grids = 3 * 24 * grid + 12 * grid + 8 * P**3
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
    """Sums over the images of one half-set on the canonical voxels, each a pair: the image weighted at its slice
    by CTF / (W + λ) with the half-set's weights and λ (its half-map) and with both half-sets' (its share of the
    full map), read at the projections of the displaced voxels; and the reference map's projections weighted the
    same way, read along straight rays (the calibration)."""

    def __init__(self, weights: list[BackProjector], half: int, lam: list[torch.Tensor | float], reference: Projector,
                 apix: float, field: DisplacementField, min_weight_fraction: float = 1e-3,
                 voxel_chunk: int = VOXEL_CHUNK):
        self.mine, self.other = weights[half], weights[1 - half]
        self.reference, self.apix, self.field, self.chunk = reference, apix, field, voxel_chunk
        self.box, self.device = self.mine.box, self.mine.device
        n = self.box
        self.sum = torch.zeros(2, n**3, dtype=torch.float64, device=self.device)
        self.reference_sum = torch.zeros_like(self.sum)
        self.x_A = canonical_points(n, apix, self.device)
        c = centered_coords(n, self.device)
        r2 = c[:, None] ** 2 + c[None, :] ** 2
        shell = torch.round(torch.sqrt(r2)).long().clamp_max(n // 2)
        self._lam = []   # λ per image pixel (box, box), at least the floor, for (this half-set, both)
        for bps, lam_i in (([self.mine], lam[0]), ([self.mine, self.other], lam[1])):
            w, shells = sum(bp.weight for bp in bps), self.mine.shell_index()
            floor = min_weight_fraction * w[shells <= n // 2].mean().clamp_min(1e-30)
            lam_t = torch.as_tensor(lam_i, dtype=torch.float64, device=self.device)
            px = lam_t[shell.clamp_max(len(lam_t) - 1)] if lam_t.ndim else torch.full(r2.shape, float(lam_t))
            self._lam.append(px.clamp(min=float(floor)).to(torch.float32))
        # the bilinear interpolation's transform, and nothing beyond Nyquist (it would alias in the 3-D grid)
        s = torch.sinc(c / n) ** 2
        self._kernel = torch.where(r2 <= (n // 2) ** 2, s[:, None] * s[None, :], torch.inf)

    def insert(self, F_img: torch.Tensor, ctf: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> None:
        """Add (B, box, box) centred transforms (origins undone) with their CTFs at RELION rotations ``A``
        (B, 3, 3) and latents ``z`` (B, zdim)."""
        A = A.to(self.device, torch.float32)
        ctf = ctf.to(self.device)
        w_mine = slice_weights(self.mine, A)
        w_both = w_mine + slice_weights(self.other, A)
        weight = torch.stack([ctf / ((w_mine + self._lam[0]) * self._kernel),
                              ctf / ((w_both + self._lam[1]) * self._kernel)], 1)          # (B, 2, n, n)
        img = ifft2c(F_img.to(self.device)[:, None] * weight).real.to(torch.float32)
        ref = ifft2c((self.reference.slice(A) * ctf)[:, None] * weight).real.to(torch.float32)
        z = z.to(self.device)
        for s in range(0, len(self.x_A), self.chunk):
            x = self.x_A[s:s + self.chunk]
            self.sum[:, s:s + self.chunk] += self._read(img, x + self.field(z, x).to(self.device, torch.float32), A)
            self.reference_sum[:, s:s + self.chunk] += self._read(ref, x, A)

    def _read(self, img: torch.Tensor, x_A: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Images (B, C, n, n) read bilinearly at the projections of points ``x_A`` ((p, 3) or (B, p, 3) Å),
        summed over the images -> (C, p) float64."""
        n = self.box
        uv = x_A @ A[:, :2, :].transpose(1, 2) / self.apix                                  # (B, p, 2) px
        grid = (uv + n // 2) * (2.0 / (n - 1)) - 1.0                                         # align_corners=True
        vals = F.grid_sample(img, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
        return vals.sum(0)[:, 0].double()

    def maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sums, the reference's) as (2, box, box, box) maps: a sum's transform is box · pad³ times the
        map's in the dense regime (a slice point's weight is spread over pad³ padded voxels per box voxel; the
        real-space sum along a voxel line is box times a slice's inverse transform)."""
        n, scale = self.box, self.box * self.mine.pad**3
        return tuple((v / scale).reshape(2, n, n, n) for v in (self.sum, self.reference_sum))


def rfft_centred(vol: torch.Tensor) -> torch.Tensor:
    """Transform (box, box, box // 2 + 1) of a map, centred along z and y (``box_weights``' grid)."""
    return torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(vol.double())), dim=(0, 1))


def shell_sums(values: torch.Tensor, shells: torch.Tensor, n: int) -> torch.Tensor:
    """Σ of ``values`` (flattened rfft grid) per shell 0 .. n // 2."""
    keep = shells <= n // 2
    return torch.zeros(n // 2 + 1, dtype=torch.float64, device=values.device).index_add_(0, shells[keep],
                                                                                          values[keep])


def calibrated_map(raw: torch.Tensor, through: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor,
                   lam: torch.Tensor | float, shells: torch.Tensor, min_power: float = 1e-6,
                   soft_edge_px: float = 3.0) -> torch.Tensor:
    """The map ``raw`` divided per shell by the real-space operator's transfer: the regression of ``through``
    (the ``reference`` map through that operator) on what the Fourier reconstruction makes of the reference,
    reference × W / (W + λ) (``weight``, ``shells``: ``box_weights``); 1 where the reference has under
    ``min_power`` of its largest shell power; zero beyond Nyquist, then BackProjector.reconstruct's soft mask."""
    n = raw.shape[-1]
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=weight.device)
    lam_v = lam_t[shells.clamp_max(len(lam_t) - 1)] if lam_t.ndim else lam_t
    target = rfft_centred(reference).flatten() * (weight / (weight + lam_v).clamp_min(1e-30))
    e = rfft_centred(through).flatten()
    num = shell_sums((e * target.conj()).real, shells, n)
    den = shell_sums(target.abs() ** 2, shells, n)
    transfer = torch.where(den > min_power * den.max(), num / den.clamp_min(1e-300), torch.ones_like(num))
    ft = rfft_centred(raw).flatten() / transfer[shells.clamp_max(n // 2)]
    ft = ft.masked_fill(shells > n // 2, 0).reshape(n, n, n // 2 + 1)
    vol = torch.fft.fftshift(torch.fft.irfftn(torch.fft.ifftshift(ft, dim=(0, 1)), s=(n, n, n)))
    if soft_edge_px > 0:
        vol = vol * sphere_mask(n, n / 2, soft_edge_px, vol.device)
    return vol.to(torch.float32)


def reconstruct_deformed(pset, latents: np.ndarray | Sequence[np.ndarray], half: np.ndarray,
                         field: DisplacementField | Sequence[DisplacementField], batch_size: int,
                         device: torch.device, box: int | None = None, wiener: str = "auto",
                         mask: torch.Tensor | None = None, voxel_chunk: int = VOXEL_CHUNK,
                         progress: Callable[[Iterable, str, int], Iterator] | None = None) -> DeformedReconstruction:
    """Corrected and homogeneous reconstructions (half-maps, full map, FSC) of the half-sets ``half`` (1 or 2
    per particle) of ``pset`` with latents ``latents`` (N, zdim) and the displacement ``field``: two passes
    over the particles in batches of ``batch_size``. ``field`` and ``latents`` may be pairs, one per half-set
    (half-set models: each half-map then depends on its own half's data alone). ``box``, ``wiener`` and ``mask`` as
    ``homogeneous.reconstruct_halves``; the corrected maps take the homogeneous reconstruction's λ."""
    lattice = Lattice(pset.box, pset.apix).cropped(box or pset.box)
    n, apix = lattice.box, lattice.apix
    prep = ImagePreparer(pset, lattice, device=device)
    pair = isinstance(field, (list, tuple))
    fields = tuple(field) if pair else (field, field)
    zs = [torch.as_tensor(np.asarray(lat, dtype=np.float32)) for lat in (latents if pair else (latents, latents))]
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
    both = bps[0].copy()
    halves, full, raw_fsc = wiener_reconstruct([both, bps[1]], wiener)   # ``both`` ends holding both half-sets
    homogeneous = _result(halves, full, mask, apix)
    lam = [wiener_lambda(bp, wiener, raw_fsc) for bp in bps] + [wiener_lambda(both, wiener, raw_fsc, True)]
    reference = Projector(full, PAD)
    sums = []
    for h in (0, 1):
        dbp = DeformedBackProjector(bps, h, [lam[h], lam[2]], reference, apix, fields[h], voxel_chunk=voxel_chunk)
        for b in stream(h, "deformed backprojection of"):
            dbp.insert(b.images_ft, b.ctf, b.rotations, zs[h][torch.as_tensor(b.rows)])
        sums.append(dbp.maps())
    del reference
    weights = [box_weights(bp) for bp in (bps[0], bps[1], both)]
    maps = [calibrated_map(sums[h][0][0], sums[h][1][0], full, weights[h][0], lam[h], weights[h][1])
            for h in (0, 1)]
    full_raw, full_through = (sums[0][i][1] + sums[1][i][1] for i in (0, 1))
    corrected_full = calibrated_map(full_raw, full_through, full, weights[2][0], lam[2], weights[2][1])
    return DeformedReconstruction(_result(maps, corrected_full, mask, apix), homogeneous)


def _result(halves: list[torch.Tensor], full: torch.Tensor, mask: torch.Tensor | None, apix: float
            ) -> Reconstruction:
    masked = fsc(halves[0] * mask, halves[1] * mask) if mask is not None else None
    return Reconstruction(full, halves[0], halves[1], fsc(*halves), masked, apix)
