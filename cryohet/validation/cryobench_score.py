"""CryoBench's scores of a heterogeneity result (Jeon et al. 2024, ml-struct-bio/CryoBench ``metrics/``).

- Per-image FSC AUC: images 0, N//n, 2·N//n, … (n = 100); the result's map for each against that image's true
  map, both multiplied by a soft mask of the true maps; FSC on CryoBench's shells, AUC = area under |FSC| over
  k/D (``metrics.cryobench_fsc`` / ``cryobench_auc``; at most 0.492 at D = 128). The per-state score averages
  those AUCs per true state, then over the states sampled.
- Neighbourhood similarity: on five interleaved subsets (every fifth particle), the mean fraction of shared k
  nearest neighbours between the ground-truth embedding and the latents, for k = 1 % … 20 % of the subset
  (CryoBench: k = 200 … 4000 of 20,000); the headline is its mean over k.
- Information imbalance (k = 1, a random subset of 2,000 particles) in both directions: Δ(latent → truth) near 0
  means the latent neighbourhoods predict the true ones, Δ(truth → latent) near 0 that the latent has nothing
  the truth lacks; 1 is no information.

The ground-truth embedding is τ (continuous sets) or the one-hot state (discrete sets), with a tiny Gaussian
smear that breaks ties at random (CryoBench's "with noise" ground truth).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cryohet.validation import metrics as M
from cryohet.validation.datasets import BenchmarkDataset
from cryohet.validation.sources import ParticleVolumes

_LOG = logging.getLogger("cryohet.validation")
N_IMAGES = 100
NS_K_FRACTIONS = np.arange(1, 21) / 100.0
NS_SPLITS = 5
II_SUBSET = 2000
MASK_LEVEL, MASK_DILATE_PX, MASK_SOFT_PX = 0.02, 3, 3.0


def truth_embedding(ds: BenchmarkDataset, seed: int = 0) -> np.ndarray:
    """(N, d) ground-truth embedding: τ, or the one-hot state for discrete sets, smeared by 10⁻⁶ of its scale."""
    t = np.eye(ds.n_states)[ds.state] if ds.kind == "discrete" else np.asarray(ds.tau, dtype=np.float64)
    scale = float(np.abs(t).max()) or 1.0
    return t + 1e-6 * scale * np.random.default_rng([seed, 31]).normal(size=t.shape)


def neighbourhood_score(latents: np.ndarray, truth: np.ndarray, splits: int = NS_SPLITS,
                        fractions: np.ndarray = NS_K_FRACTIONS) -> dict[str, Any]:
    """Neighbourhood similarity over interleaved subsets (see module doc): curve (mean, std over subsets) and
    the headline ``value`` (mean over k); ``chance`` is k/(n−1) averaged the same way."""
    n_sub = len(truth) // splits
    ks = np.unique(np.clip(np.round(fractions * n_sub).astype(int), 1, n_sub - 2))
    curves = np.array([M.neighbourhood_similarity(truth[s::splits][:n_sub], latents[s::splits][:n_sub], ks)
                       for s in range(splits)])
    return {"value": float(curves.mean()), "k": ks.tolist(), "mean": curves.mean(0).tolist(),
            "std": curves.std(0).tolist(), "chance": float(np.mean(ks / (n_sub - 1))), "subset_size": int(n_sub)}


def neighbourhood_null(truth: np.ndarray, dim: int = 8, draws: int = 100, seed: int = 0) -> dict[str, float]:
    """Neighbourhood similarity of latents without information (``draws`` draws of N × ``dim`` standard normal
    values) against ``truth``: the mean and the central 95 % band, inside which a method's value is at chance."""
    v = np.array([neighbourhood_score(np.random.default_rng([seed, 97, i]).normal(size=(len(truth), dim)),
                                      truth)["value"] for i in range(draws)])
    return {"mean": float(v.mean()), "lo": float(np.percentile(v, 2.5)), "hi": float(np.percentile(v, 97.5)),
            "draws": draws}


def imbalance_score(latents: np.ndarray, truth: np.ndarray, k: int = 1, subset: int = II_SUBSET,
                    seed: int = 0) -> dict[str, Any]:
    """Information imbalance both ways on a random subset (see module doc)."""
    idx = M.subsample(len(truth), subset, seed)
    z, t = latents[idx], truth[idx]
    return {"latent_to_truth": M.information_imbalance(z, t, k), "truth_to_latent": M.information_imbalance(t, z, k),
            "k": int(k), "n_points": int(len(idx))}


def truth_mask(ds: BenchmarkDataset, box: int) -> np.ndarray:
    """Soft mask (box³, [0, 1]) of every true map: voxels above 2 % of a map's maximum, dilated by 3 px,
    with a 3 px cosine edge."""
    from scipy import ndimage

    model = ds.true_model()
    keep = np.zeros((box,) * 3, dtype=bool)
    for s in range(ds.n_states):
        m = M.match_box(model.map(s, keep=False), box)
        keep |= m > MASK_LEVEL * float(m.max())
    keep = ndimage.binary_dilation(keep, iterations=MASK_DILATE_PX)
    dist = ndimage.distance_transform_edt(~keep)
    return np.where(dist <= MASK_SOFT_PX, 0.5 * (1 + np.cos(np.pi * dist / MASK_SOFT_PX)), 0.0).astype(np.float32)


def image_indices(n_particles: int, n_images: int = N_IMAGES) -> np.ndarray:
    """CryoBench's images: 0, N//n, 2·N//n, … (all when N < n)."""
    return np.arange(0, n_particles, max(n_particles // n_images, 1))


def per_image_fsc(volumes: ParticleVolumes, ds: BenchmarkDataset, n_images: int = N_IMAGES, chunk: int = 16,
                  log: logging.Logger | None = None) -> dict[str, Any]:
    """Per-image and per-state FSC AUC (see module doc); maps of another box are Fourier-cropped to the
    smaller of the two boxes first."""
    log = log or _LOG
    idx = image_indices(ds.n_particles, n_images)
    model = ds.true_model()
    aucs, mask, box = [], None, 0
    for c in range(0, len(idx), chunk):
        part = idx[c:c + chunk]
        maps = volumes(part)
        if mask is None:
            box = min(maps.shape[-1], ds.box)
            mask = truth_mask(ds, box)
        for i, vol in zip(part, maps, strict=True):
            ref = M.match_box(model.map(int(ds.state[i]), keep=False), box)
            aucs.append(M.cryobench_auc(M.cryobench_fsc(M.match_box(vol, box), ref, mask)))
        log.info("per-image FSC: %d/%d images", min(c + chunk, len(idx)), len(idx))
    aucs_arr = np.array(aucs)
    states = ds.state[idx]
    per_state = {int(s): float(aucs_arr[states == s].mean()) for s in np.unique(states)}
    return {"per_image_fsc_auc": float(aucs_arr.mean()), "per_image_fsc_auc_std": float(aucs_arr.std()),
            "per_state_fsc_auc": float(np.mean(list(per_state.values()))), "per_state": per_state,
            "images": idx.tolist(), "aucs": aucs_arr.tolist(), "box": int(box),
            "max_auc": float((box // 2 - 1) / box)}


def cryobench_metrics(ds: BenchmarkDataset, latents: np.ndarray | None = None,
                      volumes: ParticleVolumes | None = None, n_images: int = N_IMAGES, seed: int = 0,
                      log: logging.Logger | None = None) -> dict[str, Any]:
    """CryoBench's scores of per-particle ``latents`` (N, d) and/or per-particle maps (see module doc)."""
    out: dict[str, Any] = {}
    if latents is not None:
        z = np.asarray(latents, dtype=np.float64).reshape(ds.n_particles, -1)
        truth = truth_embedding(ds, seed)
        out["neighbourhood_similarity"] = neighbourhood_score(z, truth)
        out["information_imbalance"] = imbalance_score(z, truth, seed=seed)
    if volumes is not None:
        out["fsc"] = per_image_fsc(volumes, ds, n_images, log=log)
    return out


def summary_of(cb: dict[str, Any]) -> dict[str, float]:
    """The leaderboard numbers of ``cryobench_metrics``' output."""
    s: dict[str, float] = {}
    if "neighbourhood_similarity" in cb:
        s["neighbourhood_similarity"] = cb["neighbourhood_similarity"]["value"]
        s["ii_latent_to_truth"] = cb["information_imbalance"]["latent_to_truth"]
        s["ii_truth_to_latent"] = cb["information_imbalance"]["truth_to_latent"]
    if "fsc" in cb:
        s["per_image_fsc_auc"] = cb["fsc"]["per_image_fsc_auc"]
        s["per_state_fsc_auc"] = cb["fsc"]["per_state_fsc_auc"]
    return s
