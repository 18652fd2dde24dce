"""Reports of scores: metrics.json, a Markdown page and PNG figures (latents coloured by the truth, FSC
curves per true state, consensus heatmaps). Matplotlib's object API with the Agg canvas (no display)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from cryohet.analysis.plots import save_png
from cryohet.atomic import atomic_path

if TYPE_CHECKING:
    from cryohet.validation.datasets import BenchmarkDataset

MAX_POINTS = 20000


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return path


def _plane(z: np.ndarray) -> tuple[np.ndarray, str, str]:
    """2-D view of latents: themselves when d ≤ 2, else the first two principal components."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[1] == 1:
        return z, "z1", ""
    if z.shape[1] == 2:
        return z, "z1", "z2"
    zc = z - z.mean(0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    return zc @ vt[:2].T, "PC1", "PC2"


def plot_latents_by_truth(latents: np.ndarray, ds: BenchmarkDataset, path: str | Path, seed: int = 0) -> Path:
    """Latents (or their first two PCs) coloured by each true coordinate τ_j (continuous) or the true
    state (discrete); 1-D latents are plotted against τ."""
    xy, xl, yl = _plane(latents)
    n = len(xy)
    idx = np.arange(n) if n <= MAX_POINTS else np.random.default_rng(seed).choice(n, MAX_POINTS, replace=False)
    discrete = ds.kind == "discrete"
    colours = [ds.state] if discrete else [ds.tau[:, j] for j in range(ds.latent_dim)]
    names = ["true state"] if discrete else [f"true τ{j + 1}" for j in range(ds.latent_dim)]
    fig = Figure(figsize=(5.0 * len(colours), 4.0), layout="constrained")
    for j, (c, name) in enumerate(zip(colours, names, strict=True)):
        ax = fig.add_subplot(1, len(colours), j + 1)
        if xy.shape[1] == 1:
            jitter = np.random.default_rng(seed).uniform(-0.2, 0.2, len(idx)) if discrete else 0.0
            sc = ax.scatter(c[idx] + jitter, xy[idx, 0], c=c[idx], s=6, cmap="tab10" if discrete else "viridis")
            ax.set_xlabel(name)
            ax.set_ylabel(xl)
        else:
            sc = ax.scatter(xy[idx, 0], xy[idx, 1], c=c[idx], s=6, cmap="tab10" if discrete else "viridis")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
        fig.colorbar(sc, ax=ax, label=name)
        ax.set_title(f"latents coloured by {name}")
    return save_png(fig, path, dpi=110)


def plot_fsc_curves(volume: dict[str, Any], path: str | Path) -> Path:
    """Mean FSC curve of each evaluated true state against spatial frequency (1/Å), with 0.5 and 0.143."""
    from matplotlib import colormaps

    f = np.asarray(volume["freq_per_A"])
    rows = volume["per_state"]
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(rows):
        ax.plot(f, r["curve"], color=cmap(i / max(len(rows) - 1, 1)), lw=1.2,
                label=f"state {r['state']}" if len(rows) <= 12 else None)
    for thr in (0.5, 0.143):
        ax.axhline(thr, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC to the true map")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"per-image FSC, mean per state (AUC {volume['fsc_auc']:.3f})")
    if len(rows) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path, dpi=110)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _cryobench_lines(cb: dict[str, Any]) -> list[str]:
    """The CryoBench section of a score page (cryohet.validation.cryobench_score)."""
    if not cb:
        return []
    lines = ["## CryoBench's scores", ""]
    if "fsc" in cb:
        f = cb["fsc"]
        lines += [f"Per-image FSC AUC (masked, {len(f['images'])} images, box {f['box']}, at most "
                  f"{f['max_auc']:.3f}): **{f['per_image_fsc_auc']:.3f}** ± {f['per_image_fsc_auc_std']:.3f}; "
                  f"per-state: **{f['per_state_fsc_auc']:.3f}** ({len(f['per_state'])} states).", ""]
    if "neighbourhood_similarity" in cb:
        ns, ii = cb["neighbourhood_similarity"], cb["information_imbalance"]
        lines += [f"Neighbourhood similarity (mean over k = {ns['k'][0]} … {ns['k'][-1]} of {ns['subset_size']}): "
                  f"**{ns['value']:.3f}** (chance {ns['chance']:.3f}, perfect 1). Information imbalance "
                  f"(k = {ii['k']}, {ii['n_points']} particles; 0 perfect, 1 none): latent → truth "
                  f"**{ii['latent_to_truth']:.3f}**, truth → latent **{ii['truth_to_latent']:.3f}**.", ""]
    return lines


def score_markdown(result: dict[str, Any], figures: dict[str, str]) -> str:
    """The Markdown page of one score (``cryohet.validation.score.score`` output)."""
    d = result["dataset"]
    lines = [f"# Benchmark score: {result['label']} on {d['name']}", "",
             f"Dataset `{d['root']}`: {d['kind']}, {d['n_particles']} particles, {d['n_states']} true maps, "
             f"true τ of dimension {d['true_dim']}, box {d['box']}, {d['apix']:.3g} Å/px, SNR {d['snr']}.", "",
             "Definitions: docs/benchmarks/validation.md.", ""]
    if "latent" in result:
        lat = result["latent"]
        head = lat["headline"]
        lines += ["## Latent versus truth", "",
                  f"Headline: **{head} = {lat['value']:.3f}** (chance {lat['chance'][head]:.3f}); "
                  f"{lat['n_points']} particles, k = {lat['k']}, latent dimension {result.get('latent_dim')}.", "",
                  "| metric | value | chance (shuffled latents) |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {lat['chance'][k]:.3f} |" for k, v in lat["metrics"].items()]
        lines.append("")
        if "latents" in figures:
            lines += [f"![latents coloured by the truth]({figures['latents']})", ""]
    if "volume" in result:
        v = result["volume"]
        lines += ["## Volumes at the particles' latents versus the true maps", "",
                  f"{v['n_per_state']} particles per state, {v['n_states_evaluated']} states, box {v['box']}, "
                  f"{v['apix']:.3g} Å/px (Nyquist {v['nyquist_A']:.3g} Å); maps from: {v['source']}.", "",
                  f"**FSC AUC {v['fsc_auc']:.3f}**, resolution at 0.5: **{v['res_0.5_A']:.2f} Å**, at 0.143: "
                  f"**{v['res_0.143_A']:.2f} Å**. References: chance (true map of a random particle) "
                  f"{v['chance_fsc_auc']:.3f}, true mean map (no heterogeneity) {v['mean_map_fsc_auc']:.3f}, "
                  "perfect 1.", ""]
        homog = "homogeneous_fsc_auc" in v
        if homog:
            gain = v["fsc_auc"] - v["homogeneous_fsc_auc"]
            lines += [f"Against the homogeneous reconstruction of the same particles (one map for every particle): "
                      f"**{v['homogeneous_fsc_auc']:.3f}**; this result is **{gain:+.3f}** "
                      f"({'adds information' if gain > 0 else 'no better than one homogeneous map'}).", ""]
        lines += ["| state | τ | n | FSC AUC | res 0.5 (Å) | res 0.143 (Å) | chance AUC | mean-map AUC |"
                  + (" homogeneous-map AUC |" if homog else ""), "|---|---|---|---|---|---|---|---|"
                  + ("---|" if homog else "")]
        for r in v["per_state"]:
            tau = ", ".join(f"{t:.2f}" for t in r["tau"])
            lines.append(f"| {r['state']} | {tau} | {r['n']} | {r['fsc_auc']:.3f} | {r['res_0.5_A']:.2f} | "
                         f"{r['res_0.143_A']:.2f} | {r['chance_fsc_auc']:.3f} | {r['mean_map_fsc_auc']:.3f} |"
                         + (f" {r['homogeneous_fsc_auc']:.3f} |" if homog else ""))
        lines.append("")
        if "fsc" in figures:
            lines += [f"![FSC curves]({figures['fsc']})", ""]
    lines += _cryobench_lines(result.get("cryobench", {}))
    lines += ["## Summary", "", "| " + " | ".join(result["summary"]) + " |",
              "|" + "---|" * len(result["summary"]),
              "| " + " | ".join(_fmt(v) for v in result["summary"].values()) + " |", ""]
    return "\n".join(lines)


def write_score_report(result: dict[str, Any], out_dir: str | Path, latents: np.ndarray | None = None,
                       ds: BenchmarkDataset | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, latents_by_truth.png and fsc_curves.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"metrics": write_json(result, out_dir / "metrics.json")}
    figures: dict[str, str] = {}
    if latents is not None and ds is not None:
        paths["latents"] = plot_latents_by_truth(latents, ds, out_dir / "latents_by_truth.png")
        figures["latents"] = paths["latents"].name
    if "volume" in result:
        paths["fsc"] = plot_fsc_curves(result["volume"], out_dir / "fsc_curves.png")
        figures["fsc"] = paths["fsc"].name
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(score_markdown(result, figures))
    paths["report"] = report
    return paths


def plot_heatmaps(labels: list[str], matrices: dict[str, np.ndarray], path: str | Path) -> Path:
    """One annotated heatmap per metric (values in [0, 1]) of a pairwise agreement matrix."""
    fig = Figure(figsize=(4.4 * len(matrices), 4.0), layout="constrained")
    n = len(labels)
    for j, (name, m) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), j + 1)
        im = ax.imshow(np.asarray(m, dtype=np.float64), vmin=0.0, vmax=1.0, cmap="magma")
        ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for a in range(n):
            for b in range(n):
                ax.text(b, a, f"{m[a][b]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[a][b] < 0.6 else "black")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_png(fig, path, dpi=110)
