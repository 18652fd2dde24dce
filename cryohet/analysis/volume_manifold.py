"""A manifold of volumes (AlphaCryo4D / StructMap class): many reconstructions of particle subsets, an embedding of
those volumes, and the particles' votes for the states the embedding's clusters stand for.

Two ways to get the subsets:

- :func:`bootstrap_volumes`: resamples of a fraction of the particles, each classified into K classes (3-D
  classification with the particles' own poses, ``fit_classes``); every class is a volume whose members are the
  particles most probably in it. The resamples are balanced: each takes the particles drawn least often so far
  (ties at random), so that every particle is drawn ⌊B·f⌋ or ⌈B·f⌉ times and none is left out when B·f ≥ 1.
- :func:`latent_volumes`: k-means centres of per-particle latents (any method's), each reconstructed from the
  particles nearest it plus the rest of its k-means cluster, so that the subsets overlap and cover every particle.

Only a copy of each volume low-passed to the embedding's resolution and Fourier-cropped to a box whose Nyquist
reaches it (:func:`embedding_copy`) is kept: B·K volumes of a few thousand voxels each. The copies are masked with
a soft sphere around the particle, standardised inside it (:func:`volume_vectors`) and embedded from their squared
distances by a diffusion map or, for few volumes, by classical scaling (= PCA of the volumes) (:func:`embed`).
Clusters of the embedded volumes are the states (:func:`cluster_states`); every particle votes for the state of
each volume it belonged to (:func:`vote`; a tie goes to the state whose centre is nearest the particle's coordinate)
and takes the mean embedding coordinate of those volumes (:func:`particle_coordinates`).

Units: Å and Å/pixel for sizes and voxels; embedding coordinates are those of the diffusion map at t = 1
(eigenvector × eigenvalue, unit-free) or, for PCA, of the standardised volumes (unit-free).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Classes with fewer members than this (or than MIN_MEMBER_FRACTION of their resample) give no volume.
MIN_MEMBERS = 10
MIN_MEMBER_FRACTION = 0.02
#: Below this many volumes, ``embed(method="auto")`` uses PCA (a diffusion map needs neighbourhoods).
MIN_DIFFUSION_VOLUMES = 8

VolumeHook = Callable[[int, torch.Tensor, float], None]
Progress = Callable[[Iterable[Any], str, int | None], Iterable[Any]]


# ---------------------------------------------------------------------------------------------------
# Subsets and their volumes


@dataclass
class SubsetVolumes:
    """Volumes of particle subsets, kept only as embedding copies.

    ``volumes`` (M, m, m, m) float32 on the CPU at ``apix`` Å/px (low-passed to the embedding's resolution);
    ``members``: the particle rows of each volume; ``source`` (M, 2) int: (resample, class) of a bootstrap
    volume, (k-means centre, -1) of a latent one; ``resolution_A`` (M,): FSC-0.143 resolution of its half-maps
    on the working lattice (``work_box`` px at ``work_apix`` Å/px).
    """

    volumes: torch.Tensor
    apix: float
    members: list[np.ndarray]
    source: np.ndarray
    resolution_A: np.ndarray
    work_box: int
    work_apix: float
    dropped: int = 0            # classes left out for having too few members
    history: list[dict[str, Any]] = field(default_factory=list)   # per resample: populations, resolutions

    def __len__(self) -> int:
        return len(self.members)

    @property
    def counts(self) -> np.ndarray:
        """Members per volume (M,)."""
        return np.array([len(m) for m in self.members], dtype=np.int64)


def embedding_box(box: int, apix: float, resolution_A: float) -> int:
    """Smallest even box (at most ``box``) whose Nyquist reaches ``resolution_A`` Å, at least 16 px."""
    from cryohet.geometry.lattice import box_for_resolution

    return min(box, max(16, box_for_resolution(box, apix, resolution_A)))


def embedding_copy(vol: torch.Tensor, apix: float, box: int, resolution_A: float) -> torch.Tensor:
    """``vol`` (n, n, n) at ``apix`` Å/px Fourier-cropped to ``box`` and low-passed to ``resolution_A`` Å (raised
    cosine edge); float32 on the CPU."""
    from cryohet.geometry.fourier import fourier_crop_3d
    from cryohet.simulate.density import lowpass_map

    n = vol.shape[-1]
    v = fourier_crop_3d(vol.detach().to(torch.float32), box) if box < n else vol.detach().to(torch.float32)
    new_apix = apix * n / box
    if resolution_A > 2 * new_apix:
        v = lowpass_map(v, new_apix, resolution_A)
    return v.cpu()


def balanced_resamples(n: int, n_resamples: int, fraction: float, seed: int) -> list[np.ndarray]:
    """``n_resamples`` sorted row sets of round(``fraction``·n) particles each, without replacement within a set;
    each set takes the particles drawn least often so far, ties broken at random (``seed``)."""
    size = int(round(fraction * n))
    if not 1 <= size <= n:
        raise ValueError(f"a resample of {fraction:g} of {n} particles is empty")
    rng = np.random.default_rng([seed, 0xB007])
    drawn = np.zeros(n)
    out = []
    for _ in range(n_resamples):
        rows = np.sort(np.argsort(drawn + rng.random(n), kind="stable")[:size])
        drawn[rows] += 1
        out.append(rows)
    return out


def latent_subsets(z: np.ndarray, n_volumes: int, subset_size: int, seed: int) -> tuple[list[np.ndarray],
                                                                                         np.ndarray]:
    """(particle rows of each volume, the k-means centres (M, d)): the ``subset_size`` particles nearest each of
    ``n_volumes`` k-means centres of the latents ``z`` (N, d) (Euclidean, in the latents' own units), plus the
    other members of its k-means cluster (so that every particle belongs to at least one subset)."""
    from cryohet.analysis.latent import kmeans

    z = np.asarray(z, dtype=np.float64)
    km = kmeans(z, n_volumes, seed=seed, on_data=False)
    centres = km.raw_centers
    out = []
    for k, c in enumerate(centres):
        d2 = ((z - c) ** 2).sum(1)
        near = np.argpartition(d2, subset_size - 1)[:subset_size] if subset_size < len(z) else np.arange(len(z))
        out.append(np.union1d(near, np.flatnonzero(km.labels == k)))
    return out, centres


def bootstrap_volumes(pset: Any, half: np.ndarray, *, n_resamples: int, fraction: float, n_classes: int,
                      work_box: int, embed_box: int, resolution_A: float, iterations: int = 10,
                      ini_high_A: float = 30.0, batch_size: int = 256, device: torch.device | str = "cpu",
                      seed: int = 0, log: logging.Logger | None = None, progress: Progress | None = None,
                      em_progress: Progress | None = None, on_volume: VolumeHook | None = None) -> SubsetVolumes:
    """Classify each of ``n_resamples`` balanced resamples of ``fraction`` of ``pset`` (a ParticleSet with poses
    and CTF) into ``n_classes`` classes at ``work_box`` px (``fit_classes``, seed ``seed + b``); each class with
    enough members (its particles' most probable class) gives a volume.

    ``half``: half-set (1, 2) per particle; ``embed_box``/``resolution_A``: the kept copies (see
    :func:`embedding_copy`); ``on_volume(index, map on the working lattice, its Å/px)`` sees each volume once
    (e.g. to write it); ``progress`` wraps the resamples, ``em_progress`` each EM's passes over the images.
    """
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.classify_em import fit_classes

    log = log or logging.getLogger("cryohet")
    lattice = Lattice(pset.box, pset.apix).cropped(work_box)
    resamples = balanced_resamples(len(pset), n_resamples, fraction, seed)
    copies, members, source, res = [], [], [], []
    history, dropped = [], 0
    em_log = log.getChild("classify")
    em_log.setLevel(logging.WARNING)   # one line per resample here, not one per EM iteration
    for b, rows in enumerate((progress or (lambda items, desc, total: items))(resamples, "resamples", len(resamples))):
        fit = fit_classes(pset.subset(rows), n_classes, lattice=lattice, half=half[rows], iterations=iterations,
                          ini_high_A=ini_high_A, batch_size=batch_size, device=device, seed=seed + b, log=em_log,
                          progress=em_progress)
        labels = fit.probabilities.argmax(1)
        counts = np.bincount(labels, minlength=n_classes)
        floor = max(MIN_MEMBERS, MIN_MEMBER_FRACTION * len(rows))
        resolutions = [fit.resolution_A(k) for k in range(n_classes)]
        for k in range(n_classes):
            if counts[k] < floor:
                dropped += 1
                continue
            if on_volume is not None:
                on_volume(len(members), fit.maps[k], fit.apix)
            copies.append(embedding_copy(fit.maps[k], fit.apix, embed_box, resolution_A))
            members.append(rows[labels == k])
            source.append((b, k))
            res.append(resolutions[k])
        history.append({"resample": b, "n": int(len(rows)), "members": counts.tolist(),
                        "resolution_A": [round(r, 2) for r in resolutions]})
        log.info("resample %d/%d (%d particles): class sizes %s, resolutions %s Å", b + 1, n_resamples, len(rows),
                 " ".join(map(str, counts)), " ".join(f"{r:.1f}" for r in resolutions))
        del fit
    if not copies:
        raise ValueError("no class of any resample kept enough particles to make a volume")
    return SubsetVolumes(torch.stack(copies), lattice.apix * work_box / embed_box, members,
                         np.array(source, dtype=np.int64), np.array(res), work_box, lattice.apix, dropped, history)


def latent_volumes(pset: Any, half: np.ndarray, z: np.ndarray, *, n_volumes: int, subset_size: int, work_box: int,
                   embed_box: int, resolution_A: float, batch_size: int = 256, device: torch.device | str = "cpu",
                   seed: int = 0, progress: Progress | None = None,
                   on_volume: VolumeHook | None = None) -> tuple[SubsetVolumes, np.ndarray]:
    """Reconstruct (two half-sets, Wiener filter from their FSC) the subsets of :func:`latent_subsets` at
    ``work_box`` px; (the volumes, the k-means centres (M, d) in latent units)."""
    from cryohet.reconstruct.fsc import resolution_at
    from cryohet.reconstruct.homogeneous import reconstruct_halves

    subsets, centres = latent_subsets(z, n_volumes, subset_size, seed)
    copies, res, apix = [], [], pset.apix
    for i, rows in enumerate((progress or (lambda items, desc, total: items))(subsets, "subset volumes", len(subsets))):
        rec = reconstruct_halves(pset.subset(rows), half[rows], batch_size, device, box=work_box)
        apix = rec.apix
        if on_volume is not None:
            on_volume(i, rec.full, rec.apix)
        copies.append(embedding_copy(rec.full, rec.apix, embed_box, resolution_A))
        res.append(resolution_at(rec.fsc, rec.box, rec.apix))
        del rec
    source = np.column_stack([np.arange(len(subsets)), np.full(len(subsets), -1)])
    vols = SubsetVolumes(torch.stack(copies), apix * work_box / embed_box, subsets, source, np.array(res),
                         work_box, apix)
    return vols, centres


# ---------------------------------------------------------------------------------------------------
# Embedding


def volume_vectors(volumes: torch.Tensor, apix: float, mask_diameter_A: float = 0.0, soft_px: float = 2.0
                   ) -> tuple[np.ndarray, float]:
    """(X (M, m³) float64, the mask's radius in Å): each volume times a soft sphere, minus its mean inside the
    sphere, scaled to unit norm (so squared distances are 2 − 2 × the masked correlation).

    The sphere's radius is half of ``mask_diameter_A`` (Å), or (0) 1.1 × the radius holding the mean volume's
    voxels above 2 % of its maximum, at most the box's half minus the soft edge (``soft_px`` px).
    """
    from cryohet.geometry.masks import sphere_mask
    from cryohet.simulate.density import particle_radius_A

    m = volumes.shape[-1]
    if mask_diameter_A > 0:
        radius_A = mask_diameter_A / 2
    else:
        radius_A = 1.1 * particle_radius_A(volumes.mean(0).numpy(), apix)
    radius_px = float(min(radius_A / apix, m / 2 - soft_px))
    mask = sphere_mask(m, radius_px, soft_px).numpy().astype(np.float64).ravel()
    X = volumes.reshape(len(volumes), -1).numpy().astype(np.float64)
    X = (X - (X @ mask / mask.sum())[:, None]) * mask
    X /= np.linalg.norm(X, axis=1, keepdims=True).clip(1e-300)
    return X, radius_px * apix


def squared_distances(X: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (M, M) of the rows of ``X``, symmetric, zero diagonal."""
    sq = (X**2).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0, None)
    d2 = 0.5 * (d2 + d2.T)
    np.fill_diagonal(d2, 0.0)
    return d2


@dataclass
class VolumeEmbedding:
    """Coordinates (M, dims) of the volumes; ``method`` "diffusion" or "pca"; ``eigenvalues`` (dims,) of the
    diffusion map's Markov matrix or the PCA variances; ``epsilon``: the diffusion kernel's bandwidth (squared
    distance units; 0 for PCA)."""

    coords: np.ndarray
    method: str
    eigenvalues: np.ndarray
    epsilon: float = 0.0


def classical_scaling(d2: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (M, dims), variances (dims,)): classical multidimensional scaling of squared distances, the
    PCA of points with those distances."""
    n = len(d2)
    J = np.eye(n) - 1.0 / n
    B = -0.5 * J @ d2 @ J
    vals, vecs = np.linalg.eigh(0.5 * (B + B.T))
    order = np.argsort(vals)[::-1][:dims]
    vals = np.clip(vals[order], 0, None)
    return vecs[:, order] * np.sqrt(vals), vals / max(n - 1, 1)


def embed(d2: np.ndarray, dims: int = 2, method: str = "auto", k_neighbours: int = 10) -> VolumeEmbedding:
    """Embed points from their squared distances ``d2`` (M, M) in ``dims`` dimensions.

    ``method``: "diffusion" (density-free diffusion map, coordinates ψ_k·λ_k), "pca" (classical scaling) or "auto"
    (diffusion from MIN_DIFFUSION_VOLUMES points on, else PCA). Each coordinate's sign is fixed so that its
    largest-magnitude value is positive.
    """
    from cryohet.inference.diffusion import diffusion_map

    n = len(d2)
    if n < dims + 1:
        raise ValueError(f"{n} volumes: too few for a {dims}-D embedding")
    if method == "auto":
        method = "diffusion" if n >= max(MIN_DIFFUSION_VOLUMES, dims + 2) else "pca"
    if method == "diffusion":
        dm = diffusion_map(d2, dims, k_neighbours=k_neighbours)
        coords, vals, eps = dm.coords * dm.eigenvalues[None, :], dm.eigenvalues, dm.epsilon
    elif method == "pca":
        (coords, vals), eps = classical_scaling(d2, dims), 0.0
    else:
        raise ValueError(f"unknown embedding {method!r} (diffusion, pca or auto)")
    signs = np.sign(coords[np.argmax(np.abs(coords), axis=0), np.arange(coords.shape[1])])
    return VolumeEmbedding(coords * np.where(signs == 0, 1.0, signs), method, np.asarray(vals), float(eps))


def cluster_states(coords: np.ndarray, weights: np.ndarray, n_states: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(state per volume (M,) in 0..S-1, state centres (S, dims)): weighted k-means (``weights``: e.g. members per
    volume) of the embedding ``coords``; states numbered along the first coordinate of their centres."""
    from sklearn.cluster import KMeans

    if n_states > len(coords):
        raise ValueError(f"{len(coords)} volumes: too few for {n_states} states")
    km = KMeans(n_clusters=n_states, n_init=10, random_state=seed).fit(coords, sample_weight=weights)
    order = np.argsort(km.cluster_centers_[:, 0], kind="stable")
    rank = np.empty(n_states, dtype=np.int64)
    rank[order] = np.arange(n_states)
    return rank[km.labels_], km.cluster_centers_[order]


# ---------------------------------------------------------------------------------------------------
# Particles


@dataclass
class Votes:
    """Per particle: ``state`` (N,) int (-1: in no volume), ``fraction`` (N,) of its votes for that state (0 for
    -1), ``n_volumes`` (N,) it belonged to, ``counts`` (N, S) its votes per state."""

    state: np.ndarray
    fraction: np.ndarray
    n_volumes: np.ndarray
    counts: np.ndarray


def _pairs(members: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(particle, volume) index pairs of all memberships."""
    p = np.concatenate(members).astype(np.int64) if members else np.zeros(0, np.int64)
    v = np.repeat(np.arange(len(members)), [len(m) for m in members])
    return p, v


def vote(members: list[np.ndarray], volume_state: np.ndarray, n_particles: int, n_states: int,
         prefer: np.ndarray | None = None) -> Votes:
    """Each particle's majority state over the volumes it is a member of. Ties go to the state ``prefer`` (N,)
    names when it is among the tied ones (e.g. the state whose centre is nearest the particle's coordinate), else
    to the lowest tied state."""
    p, v = _pairs(members)
    counts = np.zeros((n_particles, n_states), dtype=np.int64)
    np.add.at(counts, (p, np.asarray(volume_state)[v]), 1)
    total = counts.sum(1)
    score = counts.astype(np.float64)
    if prefer is not None:
        ok = (prefer >= 0) & (prefer < n_states)
        score[np.flatnonzero(ok), prefer[ok]] += 0.5   # counts are integers: this only decides ties
    best = score.argmax(1)
    state = np.where(total > 0, best, -1)
    fraction = np.where(total > 0, counts[np.arange(n_particles), best] / np.maximum(total, 1), 0.0)
    return Votes(state, fraction, total, counts)


def nearest_state(coords: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index (N,) of the state centre (S, dims) nearest each of ``coords`` (N, dims); -1 for a non-finite row."""
    d2 = ((coords[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return np.where(np.isfinite(d2).all(1), np.nan_to_num(d2, nan=np.inf).argmin(1), -1)


def particle_coordinates(members: list[np.ndarray], coords: np.ndarray, n_particles: int) -> np.ndarray:
    """(N, dims): each particle's mean embedding coordinate over the volumes it is a member of; NaN in none."""
    p, v = _pairs(members)
    out = np.zeros((n_particles, coords.shape[1]))
    np.add.at(out, p, coords[v])
    n = np.bincount(p, minlength=n_particles)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n[:, None] > 0, out / n[:, None], np.nan)
