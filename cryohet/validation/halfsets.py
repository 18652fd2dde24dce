"""Half-set validation without ground truth (survey section 9.5).

The particles are split into two halves (RELION's rlnRandomSubset, or at random) and a small *probe* set
that is given to both halves. The method runs on each half (half1/, half2/, each a normal run folder;
``cryohet.methods.validate_halfsets`` runs them, this module splits and compares).
The probe particles then have a latent in each half's space: these pairs are the matched points of the two
latent spaces, whatever their labelling. Reported:

- latent agreement of the probes: cross-validated canonical correlations (mean over the first
  min(d1, d2, 3)), |Spearman| of first principal components, k-NN overlap;
- the FSC between the two halves' maps made at matched points (each model at its own latent for the same
  probe particle), and, as a control, at unmatched points (probe p in half 1, another probe in half 2);
- volume identifiability: how often a half-1 map is more alike (real-space correlation) to the half-2 map of
  the same probe than to the half-2 maps of the other probes (1 perfect, 0.5 chance; ties count half).

A method is **flagged** when its halves disagree: latent agreement below ``min_latent_corr`` (default
0.5) or volume identifiability below ``min_identifiability`` (default 0.75). Probe particles are in both
halves, so the halves are not fully independent; keep ``probe_fraction`` small (default 0.1).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.errors import InputError

MIN_LATENT_CORR = 0.5
MIN_IDENTIFIABILITY = 0.75


@dataclass
class HalfSplit:
    """Rows (indices into the input particles, ascending) of each half, probes included."""

    n_particles: int
    rows: tuple[np.ndarray, np.ndarray]
    probes: np.ndarray                   # indices into the input particles
    probe_pos: tuple[np.ndarray, np.ndarray]  # position of each probe within each half's rows
    source: str                          # "rlnRandomSubset" or "random"


def split_indices(n: int, probe_fraction: float = 0.1, subsets: np.ndarray | None = None, seed: int = 0,
                  min_probes: int = 8) -> HalfSplit:
    """Split ``n`` particles: probes (``probe_fraction``, at least ``min_probes``) go to both halves; the
    others by ``subsets`` (values 1/2, e.g. rlnRandomSubset) or at random (balanced)."""
    rng = np.random.default_rng([seed, 9001])
    n_probe = int(min(max(round(probe_fraction * n), min_probes), n // 3))
    if n_probe < 3:
        raise ValueError(f"half-set validation needs more particles (got {n})")
    probes = np.sort(rng.choice(n, n_probe, replace=False))
    rest = np.setdiff1d(np.arange(n), probes)
    source = "random"
    if subsets is not None and set(np.unique(subsets[rest]).tolist()) == {1, 2}:
        h1, h2 = rest[subsets[rest] == 1], rest[subsets[rest] == 2]
        source = "rlnRandomSubset"
    else:
        perm = rng.permutation(rest)
        h1, h2 = np.sort(perm[: len(rest) // 2]), np.sort(perm[len(rest) // 2:])
    rows = (np.union1d(h1, probes), np.union1d(h2, probes))
    pos = tuple(np.searchsorted(r, probes) for r in rows)
    return HalfSplit(n, rows, probes, pos, source)  # type: ignore[arg-type]


def parse_method_params(text: str | None) -> dict[str, str]:
    """``"zdim=8 epochs=20"`` or ``"--zdim 8 --epochs 20"`` -> {"zdim": "8", "epochs": "20"}."""
    out: dict[str, str] = {}
    toks = shlex.split(text or "")
    i = 0
    while i < len(toks):
        t = toks[i]
        if "=" in t:
            key, val = t.split("=", 1)
            out[key.lstrip("-")] = val
            i += 1
        elif t.startswith("--") and i + 1 < len(toks) and not toks[i + 1].startswith("--"):
            out[t[2:]] = toks[i + 1]
            i += 2
        elif t.startswith("--"):
            out[t[2:]] = "yes"
            i += 1
        else:
            raise ValueError(f"cannot read method parameter {t!r} (use name=value or --name value)")
    return out


def _corr_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every map of ``a`` (M, ...) with every map of ``b`` (M, ...)."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-30)
    y = (y - y.mean(1, keepdims=True)) / np.maximum(y.std(1, keepdims=True), 1e-30)
    return x @ y.T / x.shape[1]


def identifiability(c: np.ndarray) -> float:
    """Mean over rows p of the fraction of q ≠ p with c[p, q] < c[p, p] (ties count half)."""
    m = len(c)
    if m < 2:
        return float("nan")
    d = np.diag(c)[:, None]
    tol = 1e-6 * max(1.0, float(np.abs(c).max()))
    less = (c < d - tol).astype(np.float64) + 0.5 * (np.abs(c - d) <= tol)
    np.fill_diagonal(less, 0.0)
    return float(less.sum() / (m * (m - 1)))


def compare_halves(run1: str | Path, run2: str | Path, split: HalfSplit, n_volumes: int = 16, k: int = 10,
                   seed: int = 0, mask_radius_px: float | None = None, min_latent_corr: float = MIN_LATENT_CORR,
                   min_identifiability: float = MIN_IDENTIFIABILITY) -> dict[str, Any]:
    """Compare two half runs at their shared probe particles (see module doc)."""
    from cryohet.record import read_record
    from cryohet.validation import metrics as M
    from cryohet.validation.sources import load_run_volume_model, run_latents

    z = []
    for r, rows, pos in zip((run1, run2), split.rows, split.probe_pos, strict=True):
        lat = run_latents(r)
        if len(lat) != len(rows):
            raise InputError(r, f"{len(lat)} latent rows but the half has {len(rows)} particles")
        z.append(lat[pos].astype(np.float64))
    z1, z2 = z
    n_probe = len(z1)
    kk = int(max(1, min(k, n_probe // 4)))
    cc = M.cca_correlations(z1, z2, max_components=3, seed=seed)
    latent = {"cca_mean": float(np.mean(cc)), "cca": cc.tolist(),
              "spearman_pc1": M.abs_spearman(M.first_pc(z1), M.first_pc(z2)),
              "knn_overlap": 0.5 * (M.knn_overlap(z1, z2, kk) + M.knn_overlap(z2, z1, kk)),
              "knn_overlap_chance": kk / max(n_probe - 1, 1), "k": kk, "n_probes": n_probe,
              "latent_dims": [int(z1.shape[1]), int(z2.shape[1])]}
    out: dict[str, Any] = {"runs": [str(run1), str(run2)], "split": split.source,
                           "n_particles": [len(split.rows[0]), len(split.rows[1])], "latent": latent}
    reasons = []
    if latent["cca_mean"] < min_latent_corr:
        reasons.append(f"probe latents of the two halves agree poorly (mean canonical correlation "
                       f"{latent['cca_mean']:.2f} < {min_latent_corr})")
    has_models = all(read_record(r).of_kind("model") for r in (run1, run2))
    if has_models:
        m1, m2 = load_run_volume_model(run1), load_run_volume_model(run2)
        sel = np.sort(np.random.default_rng([seed, 9002]).choice(n_probe, min(n_volumes, n_probe), replace=False))
        v1, v2 = m1.volumes(z1[sel].astype(np.float32)), m2.volumes(z2[sel].astype(np.float32))
        box = min(v1.shape[-1], v2.shape[-1])
        apix = float(m1.apix) * v1.shape[-1] / box
        v1 = np.stack([M.match_box(v, box) for v in v1])
        v2 = np.stack([M.match_box(v, box) for v in v2])
        mask = None
        if mask_radius_px:
            from cryohet.geometry.masks import sphere_mask

            mask = sphere_mask(box, float(mask_radius_px)).numpy()
        matched = [M.volume_fsc(a, b, apix, mask) for a, b in zip(v1, v2, strict=True)]
        shifted = np.roll(np.arange(len(sel)), 1)
        unmatched = [M.volume_fsc(v1[i], v2[j], apix, mask) for i, j in zip(range(len(sel)), shifted, strict=True)]
        c = _corr_matrix(v1 * (mask if mask is not None else 1.0), v2 * (mask if mask is not None else 1.0))
        ident = identifiability(c)
        out["volume"] = {
            "n_volumes": len(sel), "box": box, "apix": apix, "nyquist_A": 2 * apix,
            "freq_per_A": (np.arange(box // 2 + 1) / (box * apix)).tolist(),
            "matched_fsc_auc": float(np.mean([r["auc"] for r in matched])),
            "matched_res_0.5_A": float(np.mean([r["res_0.5_A"] for r in matched])),
            "matched_res_0.143_A": float(np.mean([r["res_0.143_A"] for r in matched])),
            "unmatched_fsc_auc": float(np.mean([r["auc"] for r in unmatched])),
            "matched_curve": np.mean([r["curve"] for r in matched], axis=0).tolist(),
            "unmatched_curve": np.mean([r["curve"] for r in unmatched], axis=0).tolist(),
            "identifiability": ident}
        if ident < min_identifiability:
            reasons.append(f"maps at matched points are not more alike than at unmatched points "
                           f"(identifiability {ident:.2f} < {min_identifiability})")
    else:
        out["volume"] = None
    out.update(flagged=bool(reasons), reasons=reasons,
               thresholds={"min_latent_corr": min_latent_corr, "min_identifiability": min_identifiability})
    return out


def plot_halfsets(result: dict[str, Any], path: str | Path) -> Path:
    """FSC between the halves' maps at matched and unmatched probe points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cryohet.atomic import atomic_path

    v = result["volume"]
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    f = np.asarray(v["freq_per_A"])
    ax.plot(f, v["matched_curve"], label=f"matched points (AUC {v['matched_fsc_auc']:.3f})")
    ax.plot(f, v["unmatched_curve"], ls=":", label=f"unmatched points (AUC {v['unmatched_fsc_auc']:.3f})")
    for thr in (0.5, 0.143):
        ax.axhline(thr, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC half 1 vs half 2")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("half-set maps at the probe particles' latents")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def halfsets_markdown(result: dict[str, Any], figure: str | None) -> str:
    lat = result["latent"]
    verdict = "**FLAGGED: the halves disagree.** " + " ".join(result["reasons"]) if result["flagged"] else \
        "The halves agree (not flagged)."
    lines = [f"# Half-set validation: {result.get('method', '')}", "", verdict, "",
             f"Split: {result['split']}; particles per half (probes included): {result['n_particles']}; "
             f"{lat['n_probes']} probe particles in both halves. Thresholds: {result['thresholds']} "
             "(definitions: docs/benchmarks/validation.md).", "",
             "| probe-latent agreement | value |", "|---|---|",
             f"| mean canonical correlation (cross-validated) | {lat['cca_mean']:.3f} |",
             f"| |Spearman| of first PCs | {lat['spearman_pc1']:.3f} |",
             f"| k-NN overlap (k = {lat['k']}, chance {lat['knn_overlap_chance']:.3f}) | {lat['knn_overlap']:.3f} |",
             ""]
    v = result.get("volume")
    if v:
        lines += ["| maps at probe latents | value |", "|---|---|",
                  f"| FSC AUC, matched points | {v['matched_fsc_auc']:.3f} |",
                  f"| FSC AUC, unmatched points (control) | {v['unmatched_fsc_auc']:.3f} |",
                  f"| resolution at 0.5 / 0.143, matched (Å) | {v['matched_res_0.5_A']:.2f} / "
                  f"{v['matched_res_0.143_A']:.2f} |",
                  f"| volume identifiability (chance 0.5) | {v['identifiability']:.3f} |", ""]
        if figure:
            lines += [f"![half-set FSC]({figure})", ""]
    else:
        lines += ["The runs hold no model of the volumes: only the latents were compared.", ""]
    return "\n".join(lines)
