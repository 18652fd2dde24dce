"""Maps at latent points by kernel regression: nested neighbourhoods in latent space, each frequency shell from
the neighbourhood that half-set cross-validation picks.

Heterogeneity shows at low resolution, where a few particles suffice; at high resolution only the number of
particles matters. For a latent point p the particles are ranked by their whitened distance to p (Mahalanobis
distance under the latents' covariance); neighbourhood j holds the n_j nearest, n_j doubling up to all particles.
Each neighbourhood's two half-sets are backprojected and Wiener-filtered with their own FSC. Its error in a
shell is the residual power between the images of the nearest particles (the validation particles) and the
projections, with their CTF, of the map of the *other* half-set, so no particle predicts itself. Each shell of the
result comes from the neighbourhood of least error; the half-maps are combined the same way. The maps of all
particles (the widest neighbourhood) are computed once and shared by every point.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from cryohet.data.loader import BatchStream, Progress
from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.backproject import BackProjector
from cryohet.geometry.fourier import fft3c, ifft3c, radius_grid
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.reconstruct.fsc import fsc
from cryohet.reconstruct.homogeneous import wiener_reconstruct

#: A neighbourhood's map may supply a shell only where its half-map FSC reaches this value.
SIGNAL_FSC = 0.143


def neighbourhood_sizes(n: int, min_particles: int, n_levels: int) -> np.ndarray:
    """Particles per neighbourhood, increasing: n, n/2, n/4, ... (at most ``n_levels``, none below
    ``min_particles``), smallest first."""
    sizes = [int(n)]
    while len(sizes) < n_levels and sizes[-1] // 2 >= min_particles:
        sizes.append(sizes[-1] // 2)
    return np.array(sizes[::-1], dtype=np.int64)


class Whitening:
    """z -> coordinates in which the latents have zero mean and unit covariance; a direction of (almost) no
    spread is scaled as one with a millionth of the largest variance instead of being blown up."""

    def __init__(self, z: np.ndarray):
        z = np.asarray(z, dtype=np.float64)
        self.mean = z.mean(axis=0)
        cov = np.atleast_2d(np.cov(z - self.mean, rowvar=False))
        vals, vecs = np.linalg.eigh(cov)
        floor = max(float(vals.max()), 1e-30) * 1e-6
        self.matrix = vecs / np.sqrt(np.maximum(vals, floor))

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(np.asarray(z, dtype=np.float64)) - self.mean) @ self.matrix


@dataclass
class KernelMap:
    """The map at one latent point and how it was made."""

    full: torch.Tensor       # (box, box, box)
    half1: torch.Tensor
    half2: torch.Tensor
    fsc: np.ndarray          # FSC of the combined half-maps per shell 0 .. box // 2
    sizes: np.ndarray        # particles per neighbourhood (J,)
    radii: np.ndarray        # whitened latent distance of each neighbourhood's farthest particle (J,)
    chosen: np.ndarray       # neighbourhood index per shell 0 .. box // 2
    n_near: int              # particles within the typical neighbourhood radius of a particle

    @property
    def particles_per_shell(self) -> np.ndarray:
        """Particles behind each shell of the map."""
        return self.sizes[self.chosen]


def smooth_shells(err: np.ndarray) -> np.ndarray:
    """Running mean over three neighbouring shells along the last axis (edges over two)."""
    pad = np.pad(err, [(0, 0)] * (err.ndim - 1) + [(1, 1)], mode="edge")
    return (pad[..., :-2] + pad[..., 1:-1] + pad[..., 2:]) / 3.0


def choose_levels(errors: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Neighbourhood per shell from per-image errors (J levels, images, shells), levels ordered narrow to wide.

    The errors are smoothed over neighbouring shells. In each shell, among the ``allowed`` levels (J, shells; the
    widest is always allowed), the level of least mean error is found; the widest allowed level whose mean error
    exceeds it by no more than one standard error of the difference (over the validation images) is taken: more
    particles, hence less noise, unless fewer predict the images better beyond doubt (the one-standard-error rule).
    """
    e = smooth_shells(errors)
    n_levels, n_img, n_shells = e.shape
    ok = np.ones((n_levels, n_shells), dtype=bool) if allowed is None else np.array(allowed, dtype=bool)
    ok[-1] = True
    mean = np.where(ok, e.mean(axis=1), np.inf)
    best = np.argmin(mean, axis=0)
    chosen = best.copy()
    for s, b in enumerate(best):
        for j in range(n_levels - 1, b, -1):
            if not ok[j, s]:
                continue
            d = e[j, :, s] - e[b, :, s]
            if d.mean() <= d.std(ddof=1) / np.sqrt(n_img) if n_img > 1 else d.mean() <= 0:
                chosen[s] = j
                break
    return chosen


def combine_shells(maps: list[torch.Tensor], chosen: np.ndarray) -> torch.Tensor:
    """One map whose shell s is shell s of ``maps[chosen[s]]`` (the corners beyond Nyquist from the last)."""
    box = maps[0].shape[-1]
    shells = torch.round(radius_grid(box, 3, maps[0].device)).long().clamp_max(box // 2)
    pick = torch.as_tensor(chosen, device=maps[0].device)[shells]
    out = torch.zeros(maps[0].shape, dtype=torch.complex64, device=maps[0].device)
    for j in np.unique(chosen):
        out = torch.where(pick == int(j), fft3c(maps[int(j)]).to(torch.complex64), out)
    return ifft3c(out).real.to(torch.float32)


class KernelRegression:
    """Maps of particle set ``pset`` at latent points of ``latents`` (N, d), particles-file order.

    ``half``: half-set (1 or 2) per particle; ``box``: working box (Fourier crop of the images);
    ``min_particles``, ``n_levels``: the neighbourhood ladder (``neighbourhood_sizes``); ``max_validation``:
    validation particles at most (the nearest ones; at most the smallest neighbourhood).
    """

    def __init__(self, pset, latents: np.ndarray, half: np.ndarray, box: int, device: torch.device,
                 min_particles: int = 100, n_levels: int = 6, max_validation: int = 500, batch_size: int = 256,
                 progress: Progress | None = None):
        latents = np.asarray(latents, dtype=np.float64)
        if latents.ndim != 2 or len(latents) != len(pset):
            raise ValueError(f"{len(latents)} latent rows for {len(pset)} particles")
        self.pset, self.half, self.device = pset, np.asarray(half), torch.device(device)
        self.lattice = Lattice(pset.box, pset.apix).cropped(box)
        self.prep = ImagePreparer(pset, self.lattice, device=self.device)
        self.reader = pset.reader()
        self.whiten = Whitening(latents)
        self.w = self.whiten(latents)
        self.sizes = neighbourhood_sizes(len(pset), min_particles, n_levels)
        self.max_validation = max_validation
        self.batch_size = batch_size
        self.progress = progress
        self._all: tuple[list[torch.Tensor], torch.Tensor, np.ndarray] | None = None
        self._all_projectors: list[Projector] | None = None
        self.typical_radius = self._typical_radius()

    @property
    def box(self) -> int:
        return self.lattice.box

    @property
    def apix(self) -> float:
        return self.lattice.apix

    def _typical_radius(self, n_sample: int = 500) -> float:
        """Median over sampled particles of the distance that holds the smallest neighbourhood around them."""
        rng = np.random.default_rng(0)
        picks = rng.choice(len(self.w), min(n_sample, len(self.w)), replace=False)
        k = int(self.sizes[0]) - 1
        radii = [np.partition(((self.w - self.w[i]) ** 2).sum(1), k)[k] for i in picks]
        return float(np.sqrt(np.median(radii)))

    def _batches(self, rows: np.ndarray, desc: str) -> Iterable:
        rows = np.sort(rows)
        groups = [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        stream: Iterable = BatchStream(self.reader, groups, self.prep, prefetch=0)
        if self.progress is not None and len(groups) > 1:
            stream = self.progress(stream, desc, len(groups))
        return stream

    def _insert(self, rows: np.ndarray, bps: list[BackProjector], desc: str) -> None:
        for b in self._batches(rows, desc):
            h = torch.as_tensor(self.half[b.rows], device=b.images_ft.device)
            for k, bp in enumerate(bps):
                sel = h == k + 1
                if bool(sel.any()):
                    bp.insert(b.images_ft[sel], b.ctf[sel], b.rotations[sel])

    @staticmethod
    def _maps(bps: list[BackProjector]) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
        """(half-maps, full map, FSC of the unfiltered half-maps) of the accumulators, which are left as they were."""
        return wiener_reconstruct([bps[0].copy(), bps[1]])  # as reconstruct's maps

    def all_particles(self) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray]:
        """Half-maps, map and half-map FSC of every particle (computed once)."""
        if self._all is None:
            bps = [BackProjector(self.box, 2, self.device) for _ in (1, 2)]
            self._insert(np.arange(len(self.w)), bps, "backprojecting all particles")
            self._all = self._maps(bps)
        return self._all

    def _validation(self, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Prepared (transforms, CTF, rotations) of ``rows`` per half-set."""
        parts: list[list] = [[], []]
        for b in self._batches(rows, "reading validation particles"):
            for k in (0, 1):
                sel = torch.as_tensor(self.half[b.rows] == k + 1, device=b.images_ft.device)
                parts[k].append((b.images_ft[sel], b.ctf[sel], b.rotations[sel]))
        return [tuple(torch.cat([p[i] for p in part]) for i in range(3)) for part in parts]  # type: ignore[misc]

    def _shell_index_2d(self) -> torch.Tensor:
        return torch.round(radius_grid(self.box, 2, self.device)).long().flatten()

    def _cv_error(self, projectors: list[Projector], val) -> np.ndarray:
        """Residual power (images, shells), a mean per Fourier coefficient, of the validation images, each predicted
        by the projector of the half-map it is not in (``projectors``: of half-maps 1 and 2)."""
        n = self.box // 2 + 1
        shells = self._shell_index_2d()
        keep = shells < n
        s_keep = shells[keep]
        count = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(
            0, s_keep, torch.ones(len(s_keep), dtype=torch.float64, device=self.device)).clamp_min(1)
        errs = []
        for k, (F, ctf, A) in enumerate(val):
            for s in range(0, len(F), self.batch_size):
                f = F[s:s + self.batch_size]
                pred = projectors[1 - k].slice(A[s:s + self.batch_size]) * ctf[s:s + self.batch_size]
                p = (f - pred).abs().pow(2).reshape(len(f), -1)[:, keep].double()
                errs.append(torch.zeros(len(f), n, dtype=torch.float64, device=self.device)
                            .index_add_(1, s_keep, p) / count)
        return torch.cat(errs).cpu().numpy()

    def _projectors(self, halves: list[torch.Tensor]) -> list[Projector]:
        return [Projector(h.to(self.device)) for h in halves]

    def levels(self, point: np.ndarray) -> tuple[list[tuple[list[torch.Tensor], torch.Tensor]], np.ndarray,
                                                  np.ndarray, np.ndarray]:
        """Every neighbourhood of latent ``point`` (d,): ((half-maps, map) per neighbourhood, validation errors
        (J, images, shells), half-map FSC (J, shells), squared whitened distance of each particle to the point)."""
        d2 = ((self.w - self.whiten(point)[0]) ** 2).sum(axis=1)
        order = np.argsort(d2, kind="stable")
        val = self._validation(order[:int(min(self.sizes[0], self.max_validation))])
        bps = [BackProjector(self.box, 2, self.device) for _ in (1, 2)]
        maps: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        errors, curves, start = [], [], 0
        for j, size in enumerate(self.sizes):
            if size >= len(order):
                halves, full, curve = self.all_particles()
                if self._all_projectors is None:  # shared by every point
                    self._all_projectors = self._projectors(halves)
                projectors = self._all_projectors
            else:
                self._insert(order[start:size], bps, f"neighbourhood {j + 1}/{len(self.sizes)} ({size} particles)")
                start = int(size)
                halves, full, curve = self._maps(bps)
                projectors = self._projectors(halves)
            errors.append(self._cv_error(projectors, val))
            curves.append(curve)
            maps.append((halves, full))
        return maps, np.array(errors), np.array(curves), d2

    def map_at(self, point: np.ndarray) -> KernelMap:
        """The map, half-maps and FSC at latent ``point`` (d,)."""
        maps, errors, curves, d2 = self.levels(point)
        # a neighbourhood competes only in the shells where its half-maps hold signal (FSC 0.143); beyond, its
        # Wiener-filtered map is near zero and the errors differ by noise alone
        chosen = choose_levels(errors, curves >= SIGNAL_FSC)
        h1 = combine_shells([m[0][0] for m in maps], chosen)
        h2 = combine_shells([m[0][1] for m in maps], chosen)
        full = combine_shells([m[1] for m in maps], chosen)
        radii = np.sqrt(np.sort(d2)[np.minimum(self.sizes, len(d2)) - 1])
        n_near = int((d2 <= self.typical_radius**2).sum())
        return KernelMap(full, h1, h2, fsc(h1, h2), self.sizes.copy(), radii, chosen, n_near)
