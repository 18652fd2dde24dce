"""Consensus across methods (survey section 10): do several results on one dataset order the particles alike?

Each result is a per-particle latent array in the same particle order (a cryohet run folder, a .npy/.txt
file or cryoDRGN's z.N.pkl). For every pair: |Spearman| of their first principal components,
cross-validated canonical correlations (mean over the first min(d1, d2, 3)), and the symmetrised k-NN
overlap. All three are 1 for identical (or rotated / rescaled) latents and about 0 for unrelated ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.validation import metrics as M

METRICS = ("spearman_pc1", "cca_mean", "knn_overlap")


def pair_agreement(a: np.ndarray, b: np.ndarray, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Agreement of two latent arrays of the same particles (see module doc)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"the two latent arrays hold {len(a)} and {len(b)} particles")
    cc = M.cca_correlations(a, b, max_components=3, seed=seed)
    return {"spearman_pc1": M.abs_spearman(M.first_pc(a), M.first_pc(b)), "cca_mean": float(np.mean(cc)),
            "cca_first": float(cc[0]),
            "knn_overlap": 0.5 * (M.knn_overlap(a, b, k) + M.knn_overlap(b, a, k))}


def consensus(latents: dict[str, np.ndarray], k: int = 10, max_points: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Pairwise agreement of several latent arrays (label -> (N, d_i)); ``max_points`` particles at most
    (the same random subset for all). Returns labels, one (M, M) matrix per metric, and the pairs."""
    labels = list(latents)
    if len(labels) < 2:
        raise ValueError("consensus needs at least two results")
    n = {lab: len(np.atleast_1d(z)) for lab, z in latents.items()}
    if len(set(n.values())) != 1:
        raise InputError(None, "the results hold different numbers of particles: "
                               + ", ".join(f"{lab}: {v}" for lab, v in n.items()))
    idx = M.subsample(next(iter(n.values())), max_points, seed)
    z = {lab: np.asarray(v, dtype=np.float64).reshape(len(v), -1)[idx] for lab, v in latents.items()}
    m = len(labels)
    mats = {name: np.eye(m) for name in METRICS}
    pairs = []
    for i in range(m):
        for j in range(i + 1, m):
            agr = pair_agreement(z[labels[i]], z[labels[j]], k, seed)
            pairs.append({"a": labels[i], "b": labels[j], **agr})
            for name in METRICS:
                mats[name][i, j] = mats[name][j, i] = agr[name]
    return {"labels": labels, "n_particles": int(len(idx)), "k": int(k),
            "matrices": {name: v.tolist() for name, v in mats.items()}, "pairs": pairs}


def load_result_latents(item: str | Path) -> np.ndarray:
    """Latents of a run folder (its record) or a latent file (.npy, .txt, .pkl)."""
    from cryohet.validation.external import load_latents
    from cryohet.validation.sources import run_latents

    p = Path(item)
    return run_latents(p) if p.is_dir() else load_latents(p)


def write_consensus_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """consensus.json, consensus.png (heatmaps) and report.md (tables) in ``out_dir``."""
    from cryohet.validation.report import plot_heatmaps, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = result["labels"]
    mats = {name: np.asarray(v) for name, v in result["matrices"].items()}
    paths = {"metrics": write_json(result, out_dir / "consensus.json"),
             "plot": plot_heatmaps(labels, mats, out_dir / "consensus.png")}
    lines = ["# Consensus across methods", "",
             f"{len(labels)} results, {result['n_particles']} particles, k = {result['k']}. Each metric is 1 for "
             "latent spaces that order the particles identically and about 0 for unrelated ones "
             "(definitions: docs/benchmarks/validation.md).", "",
             "| a | b | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for p in result["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(f"{p[m]:.3f}" for m in METRICS) + " |")
    for name in METRICS:
        lines += ["", f"### {name}", "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for lab, row in zip(labels, mats[name], strict=True):
            lines.append(f"| {lab} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", f"![pairwise agreement]({paths['plot'].name})", ""]
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines))
    paths["report"] = report
    return paths
