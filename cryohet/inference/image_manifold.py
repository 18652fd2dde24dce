"""Conformational coordinates from the images themselves (ManifoldEM class, survey section 3).

1. **Projection directions.** Particles are binned by the direction they were viewed from (the third row of their
   RELION matrix) on a Fibonacci sphere fine enough to give about ``per_direction`` particles a bin; directions
   with fewer than ``min_particles`` are dropped and their particles go to the nearest kept one.
2. **Residuals in a common frame.** Each image minus the CTF-weighted projection of a consensus map at its own pose
   (what is left is what the conformation changes, and the view's spread inside a bin largely cancels), Fourier
   cropped to the resolution limit, masked by a soft circle around the particle and rotated in-plane into its
   direction's frame (rot, tilt of the direction, psi 0); its CTF is rotated with it (the astigmatism azimuth).
3. **Diffusion maps per direction.** The CTF-aware distance of ManifoldEM, |c_j y_i − c_i y_j|² summed over pixels
   (each image filtered by the other's CTF, so that differences of defocus cancel), into a density-free diffusion
   map (``inference.diffusion``); its first coordinate ψ ≈ −cos(π s) of the position s in [0, 1] along the motion.
   Directions with more than ``max_per_direction`` particles are embedded on a random subset and the others
   placed by the Nyström extension.
4. **One sense for all directions.** The motion's signature in each direction, the regression of its residuals on
   ψ (a difference image), is compared with that of its neighbouring directions after rotating both into one
   frame; the signs that agree best (Z₂ synchronisation) give every direction the same sense, and s is the
   arc-length position (``inference.diffusion.arc_length``) of ψ with its sign.
5. **Refinement across directions** (optional, :func:`refine_along`; not ManifoldEM's). Each direction sees only its
   own few hundred noisy images; the maps of particles binned along s join them all. One expectation step of
   3-D classification (``inference.classify_em``) against those ordered maps gives every particle posterior
   weights over the bins, and its new s is their mean.

Images stream in batches; memory grows with the particles of one direction, not with all of them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.ctf import ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.fourier import centered_coords, fft2c, ifft2c, radius_grid
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.masks import circle_mask
from cryohet.geometry.project import Projector
from cryohet.inference.classify_em import fit_classes
from cryohet.inference.diffusion import arc_length, diffusion_map, nystrom, synchronise_signs
from cryohet.reconstruct.homogeneous import reconstruct_halves

Progress = Callable[[Iterable, str, int], Iterable]


def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` unit vectors (n, 3) spread evenly over the sphere."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = i * math.pi * (3 - math.sqrt(5))
    r = np.sqrt(1 - z**2)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def direction_frames(directions: np.ndarray) -> np.ndarray:
    """RELION matrices (D, 3, 3) viewing along each unit vector: rot and tilt of the direction, psi 0."""
    tilt = np.degrees(np.arccos(np.clip(directions[:, 2], -1, 1)))
    rot = np.degrees(np.arctan2(directions[:, 1], directions[:, 0]))
    return euler_to_matrix(np.column_stack([rot, tilt, np.zeros_like(rot)]))


@dataclass
class DirectionBins:
    directions: np.ndarray   # (D, 3) unit vectors of the kept directions
    frames: np.ndarray       # (D, 3, 3) their RELION matrices
    label: np.ndarray        # (N,) direction of each particle

    def members(self, d: int) -> np.ndarray:
        return np.flatnonzero(self.label == d)


def bin_directions(rotations: np.ndarray, per_direction: int, min_particles: int) -> DirectionBins:
    """Particles (RELION matrices (N, 3, 3)) binned by viewing direction (see the module's text)."""
    view = rotations[:, 2, :]
    n = len(view)
    dirs = fibonacci_directions(max(1, round(n / per_direction)))
    while True:
        label = cKDTree(dirs).query(view)[1]   # the nearest direction (chord distance)
        counts = np.bincount(label, minlength=len(dirs))
        keep = counts >= min_particles
        if keep.all() or keep.sum() == 0:
            break
        dirs = dirs[keep] if keep.any() else dirs[[np.argmax(counts)]]
    if not keep.any():  # no direction holds min_particles: one bin for all
        dirs = dirs[[np.argmax(counts)]]
        label = np.zeros(n, dtype=np.int64)
    used = np.unique(label)
    remap = np.full(len(dirs), -1)
    remap[used] = np.arange(len(used))
    dirs = dirs[used]
    return DirectionBins(dirs, direction_frames(dirs), remap[label])


def inplane_rotation(A: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2): the in-plane part R₂ of R = A · frameᵀ, so that the image seen at ``frame`` is I(u) = I_A(R₂ u)
    (exact when A views along the frame's direction; a small tilt between them is ignored). ``frame``: (3, 3) or
    one per A (B, 3, 3)."""
    R = A @ frame.transpose(-1, -2)
    theta = torch.atan2(R[:, 1, 0] - R[:, 0, 1], R[:, 0, 0] + R[:, 1, 1])  # the nearest rotation about z
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rotate_images(images: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Real images (B, n, n) resampled at R₂ u (bilinear): out(u) = in(R₂ u), u = (x, y) from the box centre."""
    B, n, _ = images.shape
    c = centered_coords(n, images.device, torch.float32)
    y, x = torch.meshgrid(c, c, indexing="ij")
    u = torch.stack([x, y], -1).reshape(-1, 2)                       # (n², 2)
    src = torch.einsum("bij,pj->bpi", R2.to(torch.float32), u)      # (B, n², 2)
    grid = ((src + n // 2) / (n - 1) * 2 - 1).reshape(B, n, n, 2)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def rotated_ctf(pset, rows: np.ndarray, R2: torch.Tensor, lattice: Lattice, device: torch.device) -> torch.Tensor:
    """CTFs (B, n, n) of particles ``rows`` in their direction's frame, C(R₂ k): the astigmatism turned by R₂."""
    params = pset.ctf.take(rows)  # a copy
    theta = torch.rad2deg(torch.atan2(R2[:, 1, 0], R2[:, 0, 0])).double().cpu().numpy()
    params.defocus_angle_deg = np.asarray(params.defocus_angle_deg, np.float64) - theta
    return ctf_2d(params, lattice.box, lattice.apix, device=device).to(torch.float32)


class Residuals:
    """Images minus the consensus map's CTF-weighted projection at their pose, in their direction's frame."""

    def __init__(self, pset, consensus: torch.Tensor, lattice: Lattice, radius_px: float, mask_radius_px: float,
                 device: torch.device, batch_size: int = 256):
        self.pset, self.lattice, self.device, self.batch_size = pset, lattice, device, batch_size
        self.prep = ImagePreparer(pset, lattice, device=device)
        self.projector = Projector(consensus.to(device))
        n = lattice.box
        self.inside = radius_grid(n, 2, device) <= radius_px                             # Fourier pixels compared
        self.mask = circle_mask(n, mask_radius_px, max(2.0, 0.1 * n), device)          # soft circle, the particle

    def __call__(self, rows: np.ndarray, frame: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, c): residual transforms (B, M) complex64 and CTFs (B, M) at the compared pixels, in ``frame``."""
        frame_t = torch.as_tensor(frame, dtype=torch.float32, device=self.device)
        chunks = [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        ys, cs = [], []
        for b in BatchStream(self.pset.reader(), chunks, self.prep, prefetch=0):
            A = b.rotations
            res = b.images_ft - b.ctf * self.projector.slice(A)
            R2 = inplane_rotation(A, frame_t)
            img = rotate_images(ifft2c(res).real * self.mask, R2)
            ys.append(fft2c(img)[:, self.inside].to(torch.complex64))
            cs.append(rotated_ctf(self.pset, b.rows, R2, self.lattice, self.device)[:, self.inside])
        return torch.cat(ys), torch.cat(cs)


def ctf_distances(y: torch.Tensor, c: torch.Tensor, y2: torch.Tensor | None = None,
                  c2: torch.Tensor | None = None) -> torch.Tensor:
    """Squared CTF-aware distances Σ_k |c_j y_i − c_i y_j|² (n, m) between images (y, c) and (y2, c2)."""
    y2 = y if y2 is None else y2
    c2 = c if c2 is None else c2
    p1 = (y.abs() ** 2).double() @ (c2.double() ** 2).T
    p2 = (c.double() ** 2) @ (y2.abs() ** 2).double().T
    cross = ((c * y).to(torch.complex128) @ (c2 * y2).to(torch.complex128).conj().T).real
    return (p1 + p2 - 2 * cross).clamp_min(0)


@dataclass
class DirectionManifold:
    rows: np.ndarray          # particles of this direction
    psi: np.ndarray           # (n,) first diffusion coordinate (unit mean square)
    eigenvalues: np.ndarray   # (k,) of the diffusion map
    trend: torch.Tensor       # (M,) complex: regression of the residuals on ψ (the motion's signature here)


def embed_direction(y: torch.Tensor, c: torch.Tensor, rows: np.ndarray, n_coords: int, max_points: int,
                    k_neighbours: int, rng: np.random.Generator) -> DirectionManifold:
    """Diffusion map of one direction's residuals (``max_points`` at most; the others by Nyström)."""
    n = len(rows)
    fit = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    fit_t = torch.as_tensor(fit, device=y.device)
    d2 = ctf_distances(y[fit_t], c[fit_t]).cpu().numpy()
    dm = diffusion_map(d2, n_coords=n_coords, k_neighbours=k_neighbours)
    coords = np.empty((n, dm.coords.shape[1]))
    coords[fit] = dm.coords
    rest = np.setdiff1d(np.arange(n), fit)
    for s in range(0, len(rest), 4096):
        part = torch.as_tensor(rest[s:s + 4096], device=y.device)
        d2n = ctf_distances(y[part], c[part], y[fit_t], c[fit_t]).cpu().numpy()
        coords[rest[s:s + 4096]] = nystrom(d2n, dm, d2)
    psi = coords[:, 0]
    w = torch.as_tensor(psi, dtype=torch.float32, device=y.device)[:, None]
    trend = (w * c * y).sum(0) / ((w * c) ** 2).sum(0).clamp_min(1e-12)
    return DirectionManifold(rows, psi, dm.eigenvalues, trend)


def trend_agreement(trends: list[torch.Tensor], frames: np.ndarray, directions: np.ndarray, inside: torch.Tensor,
                    n: int, max_angle_deg: float, chunk: int = 4096) -> np.ndarray:
    """W (D, D): correlation of neighbouring directions' trends (real space, rotated into one frame), 0 for
    directions more than ``max_angle_deg`` apart."""
    D = len(trends)
    dev = trends[0].device
    grid = torch.zeros((D, n, n), dtype=torch.complex64, device=dev)
    grid[:, inside] = torch.stack(trends)
    imgs = ifft2c(grid).real
    chord = 2 * math.sin(math.radians(min(max_angle_deg, 180.0)) / 2)
    pairs = cKDTree(directions).query_pairs(chord, output_type="ndarray")
    a_idx, b_idx = pairs[:, 0], pairs[:, 1]
    fr = torch.as_tensor(frames, dtype=torch.float32, device=dev)
    W = np.zeros((D, D))
    for s in range(0, len(a_idx), chunk):
        a = torch.as_tensor(a_idx[s:s + chunk], device=dev)
        b = torch.as_tensor(b_idx[s:s + chunk], device=dev)
        ib = rotate_images(imgs[b], inplane_rotation(fr[b], fr[a]))    # b's image in a's frame
        ia = imgs[a]
        corr = (ia * ib).sum((1, 2)) / (ia.flatten(1).norm(dim=1) * ib.flatten(1).norm(dim=1)).clamp_min(1e-30)
        W[a_idx[s:s + chunk], b_idx[s:s + chunk]] = corr.cpu().numpy()
    return W + W.T


@dataclass
class ImageManifold:
    s: np.ndarray                 # (N,) position along the motion in [0, 1]
    psi: np.ndarray               # (N,) the first diffusion coordinate, with its direction's sign
    bins: DirectionBins
    signs: np.ndarray             # (D,) ±1
    agreement: float              # fraction of the neighbours' measured agreement the signs satisfy
    eigenvalues: np.ndarray       # (D, k)
    W: np.ndarray                 # (D, D) neighbour agreements


def image_manifold(pset, consensus: torch.Tensor, lattice: Lattice, *, radius_px: float, mask_radius_px: float,
                   per_direction: int = 300, min_particles: int = 50, max_per_direction: int = 2000,
                   n_coords: int = 2, k_neighbours: int = 10, neighbour_angle_deg: float | None = None,
                   device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 256,
                   progress: Progress | None = None) -> ImageManifold:
    """The position of every particle along the dominant motion, from diffusion maps of its images."""
    device = torch.device(device)
    A = euler_to_matrix(np.asarray(pset.euler_deg, dtype=np.float64))
    bins = bin_directions(A, per_direction, min_particles)
    D = len(bins.directions)
    res = Residuals(pset, consensus, lattice, radius_px, mask_radius_px, device, batch_size)
    rng = np.random.default_rng(seed)
    track = progress or (lambda items, desc, total: items)
    found: list[DirectionManifold] = []
    for d in track(range(D), "diffusion maps per direction", D):
        rows = bins.members(d)
        y, c = res(rows, bins.frames[d])
        found.append(embed_direction(y, c, rows, n_coords, max_per_direction, k_neighbours, rng))
    if neighbour_angle_deg is None:  # about two spacings of the direction grid
        neighbour_angle_deg = 2.2 * math.degrees(math.sqrt(4 * math.pi / max(D, 1)))
    W = trend_agreement([m.trend for m in found], bins.frames, bins.directions, res.inside, lattice.box,
                        neighbour_angle_deg)
    signs, agree = synchronise_signs(W)
    psi = np.empty(len(pset))
    s = np.empty(len(pset))
    for d, m in enumerate(found):
        psi[m.rows] = signs[d] * m.psi
        s[m.rows] = arc_length(signs[d] * m.psi)
    eig = np.array([m.eigenvalues for m in found])
    return ImageManifold(s, psi, bins, signs, agree, eig, W)


def refine_along(pset, s: np.ndarray, lattice: Lattice, half: np.ndarray, n_bins: int, resolution_A: float,
                 device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 256,
                 progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One round of :func:`image_manifold`'s refinement: particles binned along ``s`` into ``n_bins`` of equal
    count, each bin reconstructed (two half-sets, Wiener), every image scored against every bin's map at its pose
    (one E-step of ``fit_classes`` with those references, up to ``resolution_A``). Returns the new s, the posterior
    mean of the bins' median s, and its s.d.: the posterior spread over the bins plus each bin's own width
    (uniform within it)."""
    edges = np.quantile(s, np.linspace(0, 1, n_bins + 1))
    label = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    used = [k for k in range(n_bins) if (label == k).sum() >= 4 and len(set(half[label == k])) == 2]
    centres = np.array([np.median(s[label == k]) for k in used])
    width2 = np.array([(edges[k + 1] - edges[k]) ** 2 / 12 for k in used])
    refs = torch.stack([reconstruct_halves(pset.subset(np.flatnonzero(label == k)), half[label == k], batch_size,
                                           torch.device(device), box=lattice.box).full for k in used])
    fit = fit_classes(pset, len(used), lattice=lattice, half=half, references=refs, iterations=1,
                      ini_high_A=resolution_A, resolution_A=resolution_A, min_class_fraction=0.0,
                      batch_size=batch_size, device=device, seed=seed, progress=progress)
    p = fit.probabilities.astype(np.float64)
    mean = p @ centres
    var = p @ (centres ** 2 + width2) - mean ** 2
    return mean, np.sqrt(np.clip(var, 0, None))
