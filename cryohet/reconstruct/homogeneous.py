"""Homogeneous reconstruction: CTF-weighted Fourier backprojection of random half-sets, FSC-based Wiener filter."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.device import refuse_unless_fits
from cryohet.geometry.backproject import BackProjector, reconstruction_bytes
from cryohet.geometry.lattice import Lattice
from cryohet.reconstruct.fsc import fsc, fsc_weight, resolution_at, weight_shells


@dataclass
class Reconstruction:
    full: torch.Tensor          # (box, box, box)
    half1: torch.Tensor
    half2: torch.Tensor
    fsc: np.ndarray             # unmasked half-map FSC per shell
    fsc_masked: np.ndarray | None
    apix: float

    @property
    def box(self) -> int:
        return self.full.shape[-1]

    def resolution(self, threshold: float = 0.143, masked: bool = True) -> float:
        curve = self.fsc_masked if masked and self.fsc_masked is not None else self.fsc
        return resolution_at(curve, self.box, self.apix, threshold)


def backproject_batches(batches: Iterable[ImageBatch], box: int, device: torch.device, pad: int = 2) -> BackProjector:
    """Insert prepared batches (whole grids at ``box``) into a new accumulator."""
    bp = BackProjector(box, pad, device)
    for b in batches:
        bp.insert(b.images_ft, b.ctf, b.rotations)
    bp.flush()
    return bp


def ssnr_regularisation(bp: BackProjector, ssnr: np.ndarray) -> torch.Tensor:
    """λ per shell = mean weight in the shell / SSNR (Wiener filter from the signal-to-noise ratio)."""
    shells = bp.shell_index()
    n = len(ssnr)
    keep = shells < n
    s = shells[keep]
    sums = torch.zeros(n, dtype=torch.float64, device=bp.device).index_add_(0, s, bp.weight[keep])
    counts = torch.zeros(n, dtype=torch.float64, device=bp.device).index_add_(0, s, torch.ones_like(bp.weight[keep]))
    mean_w = sums / counts.clamp_min(1)
    return mean_w / torch.as_tensor(ssnr, device=bp.device).clamp_min(1e-6)


def ssnr_from_fsc(curve: np.ndarray) -> np.ndarray:
    """SSNR of one half-map per shell from the half-map FSC (FSC / (1 - FSC)), kept positive."""
    c = np.clip(curve, 1e-3, 0.999)
    return c / (1 - c)


def reconstruct_halves(pset, half: np.ndarray, batch_size: int, device: torch.device, box: int | None = None,
                       wiener: str = "auto", mask: torch.Tensor | None = None,
                       progress: Callable[[Iterable, str, int], Iterator] | None = None) -> Reconstruction:
    """Reconstruct the half-sets given by ``half`` (values 1 or 2 per particle) and their sum.

    ``box``: Fourier-crop the images to this box (maps keep the full box's voxel values, see geometry.lattice).

    ``wiener``: "auto" (λ from the half-map FSC), "none" (plain division, as relion_reconstruct), or a number
    c (λ = c × mean weight per shell, i.e. a constant SSNR of 1/c).
    """
    lattice = Lattice(pset.box, pset.apix).cropped(box or pset.box)
    box, apix = lattice.box, lattice.apix
    check_reconstruction_fits(box, device, pset.source)
    prep = ImagePreparer(pset, lattice, device=device)
    bps = []
    for h in (1, 2):
        idx = np.nonzero(half == h)[0]
        if len(idx) == 0:
            raise ValueError(f"half-set {h} is empty: at least two particles are needed")
        rows = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
        batches: Iterable[ImageBatch] = BatchStream(pset.reader(), rows, prep, prefetch=0)
        if progress is not None:
            batches = progress(batches, f"backprojecting half-set {h}", -(-len(idx) // batch_size))
        bps.append(backproject_batches(batches, box, device))
    half_maps, full, _ = wiener_reconstruct(bps, wiener)
    curve = fsc(*half_maps)
    curve_masked = fsc(half_maps[0] * mask, half_maps[1] * mask) if mask is not None else None
    return Reconstruction(full, half_maps[0], half_maps[1], curve, curve_masked, apix)


#: fraction of the device's free memory a reconstruction may plan to use
MEMORY_FRACTION = 0.8


def check_reconstruction_fits(box: int, device: torch.device, source, pairs: int = 1) -> None:
    """InputError naming ``source`` (the particles) when ``pairs`` half-set reconstructions at ``box`` do not fit
    in the device's free memory, with the largest box that does; checked before anything is allocated."""
    def largest_box(usable: float) -> str:
        fits = (b for b in range(box - 2, 0, -2) if reconstruction_bytes(b, pairs=pairs) <= usable)
        return f"box {next(fits, 0)}"

    refuse_unless_fits(reconstruction_bytes(box, pairs=pairs), device, MEMORY_FRACTION, source,
                       f"reconstructing {2 * pairs} half-set(s) at box {box} (padding 2)", largest_box,
                       "Fourier-crop the images to that box (reconstruct --box, or the method's crop/box option)")


def fsc_weighted_reconstruction(pset, half: np.ndarray, batch_size: int, device: torch.device,
                                progress: Callable[[Iterable, str, int], Iterator] | None = None,
                                box: int | None = None) -> Reconstruction:
    """As :func:`reconstruct_halves` with plain division (as relion_reconstruct), the full map then weighted per
    shell by √(2 FSC / (1 + FSC)) of the half-maps' FSC (RELION post-processing's FSC weighting).

    A per-shell weight on the final grid leaves the map's FSC to any reference unchanged shell by shell (as
    :func:`divide_gain_after_crop` does for "auto"). The half-maps stay unweighted. ``box``: Fourier-crop the
    images to this box first."""
    rec = reconstruct_halves(pset, half, batch_size, device, box=box, wiener="none", progress=progress)
    return replace(rec, full=weight_shells(rec.full, fsc_weight(rec.fsc)))


def wiener_reconstruct(bps: list[BackProjector], wiener: str = "auto", ssnr_scale: float = 1.0,
                       half_maps: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
    """(half-maps, full map, FSC of the unregularised half-maps) from the two half-sets' accumulators.

    ``wiener``: "auto" (λ from the half-map FSC, the full map's SSNR twice a half's), "none" (plain division),
    or a number c (constant SSNR 1/c). ``ssnr_scale`` multiplies the SSNR of "auto" (RELION's T: above 1 trusts
    the data more). ``half_maps`` False skips the filtered half-maps (an empty list; two fewer transforms).
    Each map is divided as :func:`divide_gain_after_crop` (its FSC to any reference is then as plain division's
    or better, shell by shell). ``bps[0]`` ends holding the sum of both half-sets.
    """
    raw_fsc = fsc(*[bp.reconstruct() for bp in bps])
    halves = [divide_gain_after_crop(bp, wiener_lambda(bp, wiener, raw_fsc, ssnr_scale=ssnr_scale))
              for bp in bps] if half_maps else []
    bps[0].add(bps[1])
    return halves, divide_gain_after_crop(bps[0], wiener_lambda(bps[0], wiener, raw_fsc, True, ssnr_scale)), raw_fsc


def divide_gain_after_crop(bp: BackProjector, lam: torch.Tensor | float) -> torch.Tensor:
    """``bp``'s map divided with λ (per shell, or a constant: plain ``reconstruct``) so that λ only reweights the
    voxels within each shell before the real-space crop and edge mask; each shell's mean Wiener gain
    (``BackProjector.wiener_gain``) is applied after them, on the final grid, where it is diagonal in shells.

    A λ that rises steeply from one shell to the next, applied before the crop, lets the crop and mask leak
    strong low-resolution shells into weak high ones: on AdK (2000 × 64², 2 Å/px, SNR 0.1) the FSC to the true
    map fell to 0.296 at 6.7 Å where relion_reconstruct's plain division keeps 0.366; divided this way it is
    0.369 there and within 0.004 of relion_reconstruct's at every shell (``bench/bench_ppca_mean.py``)."""
    if not torch.is_tensor(lam):
        return bp.reconstruct(lam)
    gain = bp.wiener_gain(lam)
    return weight_shells(bp.reconstruct(lam, shell_gain=gain), gain.cpu().numpy())


def wiener_lambda(bp: BackProjector, wiener: str, raw_fsc: np.ndarray, both_halves: bool = False,
                  ssnr_scale: float = 1.0) -> torch.Tensor | float:
    """λ per shell of ``bp``'s weights for ``wiener`` (as ``wiener_reconstruct``; 0 for "none"), from the FSC of
    the unregularised half-maps ``raw_fsc``; ``both_halves``: ``bp`` holds both half-sets (the full map, whose
    SSNR is twice a half's under "auto")."""
    if wiener == "none":
        return 0.0
    if wiener == "auto":
        ssnr = ssnr_scale * ssnr_from_fsc(raw_fsc) * (2 if both_halves else 1)
    else:
        ssnr = np.full(bp.box // 2 + 1, 1 / float(wiener))
    return ssnr_regularisation(bp, ssnr)


def random_halves(n: int, rng: np.random.Generator, existing: np.ndarray | None = None) -> np.ndarray:
    """Half-set label (1 or 2) per particle: ``existing`` (rlnRandomSubset) when valid, else a random even split."""
    if existing is not None and set(np.unique(existing)) == {1, 2}:
        return existing.astype(int)
    half = np.ones(n, dtype=int)
    half[rng.permutation(n)[: n // 2]] = 2
    return half


def particle_halves(pset, seed: int) -> np.ndarray:
    """Half-set per particle of ``pset``: its rlnRandomSubset when valid, else a random even split (``seed``)."""
    existing = pset.table["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in pset.table else None
    return random_halves(len(pset), np.random.default_rng(seed), existing)
