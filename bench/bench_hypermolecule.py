"""Benchmark of ``cryohet hypermolecule`` against ``cryohet train-vae`` on the simulated hinge (docs/benchmarks.md).

For each SNR one benchmark dataset (``cryohet.validation.datasets``, hinge, box 32) is made and both methods run
on its particles in this one process, one after the other, with one thread: the hyper-molecule (degree 3, band
limit at Nyquist as the VAE's maps, 20 Monte Carlo EM iterations) and the VAE (1-D latent, so that both give one
coordinate; encoder and decoder 3 × 256, ``--vae_epochs``). Reported per method: |Spearman| of the latent with the
true τ and CryoBench's per-image FSC AUC of the model's map at each particle's latent against its true map (both
from ``cryohet.validation.score.score_run``, the same code for both), wall time, and the empirical coverage of the
90 % intervals of τ after the cross-fitted monotone calibration (``cryohet.validation.coverage``): the
hyper-molecule's posterior 5-95 % quantiles, the VAE's q(z | x) mean ± 1.645 s.d. Prints a Markdown table with
the ratios (hyper-molecule / VAE) and writes ``<out>/hypermolecule.json``.

    .venv/bin/python bench/bench_hypermolecule.py --out /tmp/bench-hm [--n 800] [--snrs 1 0.1] [--vae_epochs 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")


def run(method: str, params: dict[str, Any], out: Path) -> float:
    from cryohet.methods import all_methods
    from cryohet.runner import run_method

    t = time.time()
    run_method(all_methods()[method], {"overwrite": True, "threads": 1, **params}, out)
    return time.time() - t


def intervals(run_dir: Path, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of each particle's 90 % interval of its 1-D latent."""
    if method == "hypermolecule":
        post = np.load(run_dir / "tau_posterior.npy")
        return post[:, 0], post[:, 2], post[:, 3]
    mu = np.load(run_dir / "z.npy")[:, 0]
    sd = np.exp(0.5 * np.load(run_dir / "z_logvar.npy")[:, 0])
    return mu, mu - 1.645 * sd, mu + 1.645 * sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--vae_epochs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=20)
    a = ap.parse_args()

    from cryohet.validation.coverage import calibrated_coverage
    from cryohet.validation.datasets import load_dataset, make_dataset
    from cryohet.validation.score import score_run

    methods = {"hypermolecule": {"iterations": a.iterations, "resolution_A": 0.0},
               "train-vae": {"zdim": 1, "epochs": a.vae_epochs}}
    rows = []
    for snr in a.snrs:
        root = a.out / f"hinge_b{a.box}_n{a.n}_snr{snr:g}"
        ds = load_dataset(root) if (root / "particles.star").exists() else \
            make_dataset("hinge", root, box=a.box, n_particles=a.n, snr=snr, seed=1)
        for method, params in methods.items():
            run_dir = a.out / f"{method}_snr{snr:g}"
            secs = run(method, {"particles": str(ds.particles_star), **params}, run_dir)
            s = score_run(run_dir, ds.root)["summary"]
            cov = calibrated_coverage(*intervals(run_dir, method), ds.tau[:, 0])
            rows.append({"snr": snr, "method": method, "seconds": round(secs, 1), "spearman": s["latent_score"],
                         "per_image_fsc_auc": s["per_image_fsc_auc"], "fsc_auc": s["fsc_auc"],
                         "coverage90": cov["coverage"], "interval_width": cov["mean_width"]})
            print(json.dumps(rows[-1]), flush=True)
    (a.out / "hypermolecule.json").write_text(json.dumps(rows, indent=1))
    print("\n| SNR | method | Spearman (abs) vs τ | per-image FSC AUC | coverage of 90 % intervals (width in τ) | "
          "wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['snr']:g} | {r['method']} | {r['spearman']:.3f} | {r['per_image_fsc_auc']:.3f} | "
              f"{r['coverage90']:.3f} ({r['interval_width']:.3f}) | {r['seconds']:.0f} |")
    print("\n| SNR | ratio hyper-molecule / train-vae: Spearman (abs) | per-image FSC AUC | wall time |\n"
          "|---|---|---|---|")
    for snr in a.snrs:
        h, v = (next(r for r in rows if r["snr"] == snr and r["method"] == m) for m in methods)
        print(f"| {snr:g} | {h['spearman'] / v['spearman']:.2f} | "
              f"{h['per_image_fsc_auc'] / v['per_image_fsc_auc']:.2f} | {h['seconds'] / v['seconds']:.2f} |")


if __name__ == "__main__":
    main()
