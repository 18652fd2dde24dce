"""Scoring a heterogeneity result against a benchmark's ground truth (definitions: docs/benchmarks/validation.md).

Volume accuracy: for a sample of particles of each true state, the FSC between the map the result gives
that particle and the particle's true map; the area under the FSC curve and the resolutions at 0.5 and
0.143 are averaged over the sampled particles of a state, then over states (each state counts once).
Latent accuracy: |Spearman| of the first principal component against τ (1-D motions), k-NN overlap between
latent and true neighbourhoods (all), cross-validated CCA and k-NN regression R² (continuous), adjusted
Rand index of k-means clusters (discrete). Each latent metric is also computed on the latents shuffled
across particles, which gives its chance level.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.errors import InputError
from cryohet.validation import metrics as M
from cryohet.validation.datasets import BenchmarkDataset, load_dataset
from cryohet.validation.sources import ParticleVolumes

_LOG = logging.getLogger("cryohet.validation")

#: The headline latent metric of each kind of dataset.
HEADLINE = {"continuous-1d": "spearman_pc1", "continuous-nd": "knn_overlap", "discrete": "ari"}


def dataset_family(ds: BenchmarkDataset) -> str:
    if ds.kind == "discrete":
        return "discrete"
    return "continuous-1d" if ds.latent_dim == 1 else "continuous-nd"


def latent_metrics(latents: np.ndarray, ds: BenchmarkDataset, k: int = 10, max_points: int = 20000,
                   seed: int = 0) -> dict[str, Any]:
    """Latent-versus-truth agreement (see module doc); ``max_points`` particles at most (random subset)."""
    z_all = np.asarray(latents, dtype=np.float64)
    if z_all.ndim == 1:
        z_all = z_all[:, None]
    if len(z_all) != ds.n_particles:
        raise InputError(None, f"{len(z_all)} latent rows but the dataset has {ds.n_particles} particles "
                               "(latents must be in the order of the dataset's particles.star)")
    idx = M.subsample(len(z_all), max_points, seed)
    tau, state = ds.tau[idx], ds.state[idx]
    family = dataset_family(ds)
    truth = np.eye(ds.n_states)[state] if family == "discrete" else tau

    def compute(z: np.ndarray) -> dict[str, float]:
        out = {"knn_overlap": M.knn_overlap(z, truth, k)}
        if family == "discrete":
            out["ari"] = M.kmeans_ari(z, state, ds.n_states, seed)
        else:
            if family == "continuous-1d":
                out["spearman_pc1"] = M.spearman_pc1(z, tau)
            axes = M.best_axis_spearman(z, tau)
            out["spearman_best_axis"] = float(np.mean(axes))
            cc = M.cca_correlations(z, tau, max_components=tau.shape[1], seed=seed)
            out["cca_mean"] = float(np.mean(cc))
            out["knn_r2"] = M.knn_regression_r2(z, tau, k=k, seed=seed)
        return out

    z = z_all[idx]
    result = compute(z)
    chance = compute(z[np.random.default_rng(seed + 1).permutation(len(z))])
    head = HEADLINE[family]
    return {"family": family, "headline": head, "value": result[head], "metrics": result, "chance": chance,
            "k": int(k), "n_points": int(len(idx))}


def choose_states(ds: BenchmarkDataset, max_states: int) -> np.ndarray:
    """States to evaluate: all when K ≤ max_states, else evenly spread along the state index; only
    states that have particles."""
    present = np.unique(ds.state)
    if len(present) <= max_states:
        return present
    return present[np.unique(np.round(np.linspace(0, len(present) - 1, max_states)).astype(int))]


def homogeneous_map(ds: BenchmarkDataset, batch_size: int = 256, device: str = "cpu", seed: int = 0) -> np.ndarray:
    """The homogeneous reconstruction of the dataset's particles (random half-sets, plain division, FSC-weighted
    per shell: ``reconstruct.homogeneous.fsc_weighted_reconstruction``, at every shell at least as close to the
    truth as ``cryohet reconstruct``'s and relion_reconstruct's maps): the one map a heterogeneity method has
    to beat."""
    import torch

    from cryohet.io.particles import load_particles
    from cryohet.reconstruct.homogeneous import fsc_weighted_reconstruction, particle_halves

    pset = load_particles(ds.particles_star)
    rec = fsc_weighted_reconstruction(pset, particle_halves(pset, seed), batch_size, torch.device(device))
    return rec.full.cpu().numpy().astype(np.float32)


def volume_metrics(volumes: ParticleVolumes, ds: BenchmarkDataset, n_per_state: int = 4, max_states: int = 20,
                   seed: int = 0, mask_radius_px: float | None = None, chunk: int = 16,
                   log: logging.Logger | None = None, homogeneous: np.ndarray | None = None) -> dict[str, Any]:
    """Per-image volume FSC against the true maps (see module doc).

    When the result's box differs from the dataset's, the larger maps are Fourier-cropped to the smaller
    box (same field of view). ``mask_radius_px`` (in the compared box) applies a soft sphere to both maps.
    Also reports two references: ``chance`` (each state's true map against the true maps of randomly drawn
    particles: what shuffled latents would score) and ``mean_map`` (against the population-weighted mean of
    the true maps: a result without heterogeneity); with ``homogeneous`` (a homogeneous reconstruction of the
    same particles, :func:`homogeneous_map`) a third, ``homogeneous``: that map used for every particle, scored
    the same way (what a user gets without a heterogeneity method).
    """
    log = log or _LOG
    rng = np.random.default_rng(seed)
    states = choose_states(ds, max_states)
    true_model = ds.true_model()
    picks = {int(s): rng.choice(np.flatnonzero(ds.state == s), min(n_per_state, int((ds.state == s).sum())),
                                replace=False) for s in states}
    order = [(s, int(i)) for s in picks for i in picks[s]]
    per_state: dict[int, list[dict]] = {int(s): [] for s in states}
    box, apix, mask, truth = 0, 0.0, None, {}
    for c in range(0, len(order), chunk):
        part = order[c:c + chunk]
        maps = volumes(np.array([i for _, i in part]))
        if not truth:  # the compared box: the smaller of the result's and the dataset's
            box = min(maps.shape[-1], ds.box)
            apix = ds.apix * ds.box / box
            if mask_radius_px:
                from cryohet.geometry.masks import sphere_mask

                mask = sphere_mask(box, float(mask_radius_px)).numpy()
            truth = {int(s): M.match_box(true_model.map(int(s)), box) for s in states}
        for (s, _), vol in zip(part, maps, strict=True):
            per_state[s].append(M.volume_fsc(M.match_box(vol, box), truth[s], apix, mask))
        log.info("volume FSC: %d/%d particles", min(c + chunk, len(order)), len(order))
    rows = []
    for s in states:
        st = per_state[int(s)]
        rows.append({"state": int(s), "tau": ds.state_tau[int(s)].tolist(), "n": len(st),
                     "fsc_auc": float(np.mean([r["auc"] for r in st])),
                     "res_0.5_A": float(np.mean([r["res_0.5_A"] for r in st])),
                     "res_0.143_A": float(np.mean([r["res_0.143_A"] for r in st])),
                     "curve": np.mean([r["curve"] for r in st], axis=0).tolist()})
    # references: chance (random particle's true map) and the population-weighted mean map
    w = ds.populations[states] / ds.populations[states].sum()
    mean_map = np.zeros((box,) * 3, dtype=np.float64)
    for t in range(ds.n_states):
        if ds.populations[t] > 0:
            mean_map += ds.populations[t] * M.match_box(true_model.map(t, keep=False), box)
    chance_auc, mean_auc = [], []
    homog = None if homogeneous is None else M.match_box(np.asarray(homogeneous, np.float32), box)
    for s in states:
        aucs = [1.0 if s == t else M.volume_fsc(truth[int(t)], truth[int(s)], apix, mask)["auc"] for t in states]
        chance_auc.append(float(np.dot(w, aucs)))
        mean_auc.append(M.volume_fsc(mean_map.astype(np.float32), truth[int(s)], apix, mask)["auc"])
    for row, ca, ma in zip(rows, chance_auc, mean_auc, strict=True):
        row["chance_fsc_auc"], row["mean_map_fsc_auc"] = ca, ma
        if homog is not None:
            row["homogeneous_fsc_auc"] = M.volume_fsc(homog, truth[row["state"]], apix, mask)["auc"]
    extra = {} if homog is None else {
        "homogeneous_fsc_auc": float(np.mean([r["homogeneous_fsc_auc"] for r in rows]))}
    return {"fsc_auc": float(np.mean([r["fsc_auc"] for r in rows])),
            "res_0.5_A": float(np.mean([r["res_0.5_A"] for r in rows])),
            "res_0.143_A": float(np.mean([r["res_0.143_A"] for r in rows])),
            "chance_fsc_auc": float(np.mean(chance_auc)), "mean_map_fsc_auc": float(np.mean(mean_auc)),
            "box": int(box), "apix": float(apix), "nyquist_A": float(2 * apix),
            "freq_per_A": (np.arange(box // 2 + 1) / (box * apix)).tolist(),
            "n_per_state": int(n_per_state), "n_states_evaluated": len(rows), "per_state": rows,
            "source": volumes.describe, **extra}


def score(ds: BenchmarkDataset | str | Path, latents: np.ndarray | None = None,
          volumes: ParticleVolumes | None = None, *, label: str = "result", k: int = 10, n_per_state: int = 4,
          max_states: int = 20, max_points: int = 20000, seed: int = 0, mask_radius_px: float | None = None,
          n_images: int = 100, log: logging.Logger | None = None, homogeneous: np.ndarray | None = None
          ) -> dict[str, Any]:
    """Score per-particle ``latents`` (N, d) and/or per-particle maps against benchmark ``ds``; ``homogeneous``:
    a homogeneous reconstruction of the same particles, scored as the maps' reference (``volume_metrics``).

    Returns a JSON-able dict: ``summary`` (the numbers for a methods × datasets table), ``latent`` and
    ``volume`` (details, per state, chance levels), ``cryobench`` (CryoBench's scores on ``n_images`` images:
    cryohet.validation.cryobench_score), ``dataset``.
    """
    from cryohet.validation.cryobench_score import cryobench_metrics, summary_of

    if not isinstance(ds, BenchmarkDataset):
        ds = load_dataset(ds)
    if latents is None and volumes is None:
        raise ValueError("nothing to score: give latents, volumes or both")
    out: dict[str, Any] = {"label": label, "dataset": {
        "name": ds.name, "kind": ds.kind, "root": str(ds.root), "n_particles": ds.n_particles,
        "n_states": ds.n_states, "true_dim": ds.latent_dim, "box": ds.box, "apix": ds.apix,
        "snr": ds.meta.get("snr")}}
    summary: dict[str, Any] = {"dataset": ds.name, "label": label}
    if latents is not None:
        lat = latent_metrics(latents, ds, k=k, max_points=max_points, seed=seed)
        out["latent"] = lat
        out["latent_dim"] = int(np.atleast_2d(np.asarray(latents).T).shape[0])
        summary.update({"latent_metric": lat["headline"], "latent_score": lat["value"],
                        "latent_chance": lat["chance"][lat["headline"]],
                        "knn_overlap": lat["metrics"]["knn_overlap"]})
    if volumes is not None:
        vol = volume_metrics(volumes, ds, n_per_state=n_per_state, max_states=max_states, seed=seed,
                             mask_radius_px=mask_radius_px, log=log, homogeneous=homogeneous)
        out["volume"] = vol
        summary.update({k_: vol[k_] for k_ in ("fsc_auc", "res_0.5_A", "res_0.143_A", "chance_fsc_auc",
                                               "mean_map_fsc_auc", "homogeneous_fsc_auc") if k_ in vol})
    out["cryobench"] = cryobench_metrics(ds, latents, volumes, n_images=n_images, seed=seed, log=log)
    summary.update(summary_of(out["cryobench"]))
    out["summary"] = summary
    return out


# ------------------------------------------------------------------------------------------ sources


def true_answer(ds: BenchmarkDataset, shuffle: bool = False, seed: int = 0) -> tuple[np.ndarray, ParticleVolumes]:
    """The known-good answer: true τ per particle and the true maps at τ; with ``shuffle`` the τ permuted
    across particles (a chance-level answer)."""
    z = ds.true_latents()
    if shuffle:
        z = z[np.random.default_rng(seed + 12345).permutation(len(z))]
    return z, ParticleVolumes.from_model(ds.true_model(), z, "true maps at " + ("shuffled " if shuffle else "") + "τ")


def score_true_answer(dataset_dir: str | Path | BenchmarkDataset, shuffle: bool = False, seed: int = 0,
                      **kw: Any) -> dict[str, Any]:
    """Score ``true_answer``: each metric's ceiling (or, shuffled, its chance level) on this dataset."""
    ds = dataset_dir if isinstance(dataset_dir, BenchmarkDataset) else load_dataset(dataset_dir)
    z, pv = true_answer(ds, shuffle, seed)
    return score(ds, z, pv, label="truth (shuffled)" if shuffle else "truth", seed=seed, **kw)


def score_one_map(dataset_dir: str | Path | BenchmarkDataset, volume: np.ndarray | str | Path,
                  label: str = "one homogeneous map", **kw: Any) -> dict[str, Any]:
    """Score one map (an array at the dataset's box and pixel size, or an MRC file) given to every particle
    (volume scores only): the homogeneous reference that a heterogeneity method's maps have to beat."""
    from cryohet.models.maps import MapsModel

    ds = dataset_dir if isinstance(dataset_dir, BenchmarkDataset) else load_dataset(dataset_dir)
    maps = [volume] if isinstance(volume, (str, Path)) else np.asarray(volume, dtype=np.float32)[None]
    model = MapsModel(maps, np.zeros((1, 1)), None if isinstance(volume, (str, Path)) else ds.apix)
    pv = ParticleVolumes.from_model(model, np.zeros((ds.n_particles, 1), np.float32), label)
    return score(ds, None, pv, label=label, **kw)


def score_run(run_dir: str | Path, dataset_dir: str | Path, volumes: bool = True, **kw: Any) -> dict[str, Any]:
    """Score a cryohet run folder: its registered ``latents`` and, when it has a ``model`` output and
    ``volumes``, the maps of that model at each particle's latent (cryohet.models.base.load_volume_model; for a
    model that is not a volume model, the maps of its first volume series at the nearest latent point)."""
    from cryohet.record import read_record
    from cryohet.validation.sources import run_latents, run_volume_model

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    z = run_latents(run_dir)
    pv = None
    if volumes and record.of_kind("model"):
        model = run_volume_model(run_dir)
        pv = ParticleVolumes.from_model(model, z, f"{record.method} model")
    kw.setdefault("label", record.method)
    return score(dataset_dir, z, pv, **kw)


def score_arrays(latents: np.ndarray | str | Path, dataset_dir: str | Path, volumes_dir: str | Path | None = None,
                 volume_labels: np.ndarray | str | Path | None = None,
                 volume_latents: np.ndarray | str | Path | None = None, **kw: Any) -> dict[str, Any]:
    """Score plain per-particle latents (array or .npy/.txt/.pkl file) and, optionally, a folder of maps:
    each particle's map is ``volume_labels[i]`` (a per-particle index into the name-sorted maps, e.g.
    cluster labels) or the map whose latent in ``volume_latents`` (K, d) is nearest the particle's latent."""
    from cryohet.validation.external import list_volumes, load_labels, load_latents

    z = load_latents(latents) if isinstance(latents, (str, Path)) else np.asarray(latents, dtype=np.float32)
    if z.ndim == 1:
        z = z[:, None]
    pv = None
    if volumes_dir is not None:
        maps = list_volumes(volumes_dir)
        if volume_labels is not None:
            lab = load_labels(volume_labels) if isinstance(volume_labels, (str, Path)) else np.asarray(volume_labels)
            if len(lab) != len(z):
                raise InputError(None, f"{len(lab)} labels for {len(z)} particles")
            pv = ParticleVolumes.from_labels(maps, lab, describe=f"maps of {volumes_dir} by label")
        elif volume_latents is not None:
            from cryohet.validation.sources import MapsModel

            cen = load_latents(volume_latents) if isinstance(volume_latents, (str, Path)) else np.asarray(
                volume_latents, dtype=np.float64)
            pv = ParticleVolumes.from_model(MapsModel(maps, np.atleast_2d(cen).reshape(len(maps), -1)), z,
                                            f"maps of {volumes_dir} at nearest latent")
        else:
            raise InputError(volumes_dir, "say which map belongs to which particle: give per-particle labels "
                                          "or the latent point of each map")
    return score(dataset_dir, z, pv, **kw)


def score_cryodrgn(z_file: str | Path, dataset_dir: str | Path, weights: str | Path | None = None,
                   config: str | Path | None = None, flip: bool = False, downsample: int | None = None,
                   **kw: Any) -> dict[str, Any]:
    """Score cryoDRGN outputs: latents ``z.N.pkl`` (restricted unpickler) and, with ``weights`` and
    ``config``, the decoder's maps made by ``cryodrgn eval_vol`` (cryoDRGN must be installed)."""
    from cryohet.validation.external import CryoDRGNVolumeModel, load_latents

    z = load_latents(z_file)
    pv = None
    if weights is not None or config is not None:
        if weights is None or config is None:
            raise InputError(None, "cryoDRGN volumes need both the weights (weights.N.pkl) and config.yaml")
        ds = load_dataset(dataset_dir)
        model = CryoDRGNVolumeModel(weights, config, z.shape[1], ds.box, ds.apix, flip=flip,
                                    downsample=downsample, log=kw.get("log"))
        pv = ParticleVolumes.from_model(model, z, "cryoDRGN decoder")
    kw.setdefault("label", "cryoDRGN")
    return score(dataset_dir, z, pv, **kw)
