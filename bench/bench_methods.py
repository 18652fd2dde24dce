"""Methods × datasets: every heterogeneity method of cryohet scored on the same ground-truth benchmarks.

    .venv/bin/python bench/bench_methods.py --out /tmp/bench_methods --box 32 --n 2000 --snr 0.5 --epochs 20

Builds the CryoBench-style datasets of ``cryohet benchmark-make`` (hinge, two-part, discrete), runs each method
through its method description (the same code path as ``cryohet <method>``) and scores it with
``cryohet.validation.score.score_run``; prints the Markdown table kept in docs/benchmarks.md, with the truth
(ceiling) and shuffled truth (chance) rows of each dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.methods import get_method  # noqa: E402
from cryohet.runner import run_method  # noqa: E402
from cryohet.validation.datasets import make_dataset  # noqa: E402
from cryohet.validation.score import score_run, score_true_answer  # noqa: E402

DATASETS = ("hinge", "two-part", "discrete")


def row(name: str, method: str, s: dict, seconds: float | None) -> str:
    t = f"{seconds:.0f}" if seconds is not None else "–"
    return (f"| {name} | {method} | {s.get('latent_metric', '–')} {s.get('latent_score', float('nan')):.2f} "
            f"(chance {s.get('latent_chance', float('nan')):.2f}) | {s.get('knn_overlap', float('nan')):.2f} "
            f"| {s.get('fsc_auc', float('nan')):.3f} (chance {s.get('chance_fsc_auc', float('nan')):.3f}, "
            f"mean map {s.get('mean_map_fsc_auc', float('nan')):.3f}) | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_methods"))
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--n", type=int, default=2000, help="particles per dataset")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=20, help="train-vae epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = ap.parse_args()
    methods = {
        "principal-volumes": {"n_components": 2},
        "train-vae": {"epochs": args.epochs},
    }
    lines = []
    for name in args.datasets:
        ds_dir = args.out / name
        if not (ds_dir / "benchmark.json").exists():
            make_dataset(name, ds_dir, box=args.box, n_particles=args.n, snr=args.snr)
        lines.append(row(name, "truth (ceiling)", score_true_answer(ds_dir)["summary"], None))
        lines.append(row(name, "shuffled truth (chance)", score_true_answer(ds_dir, shuffle=True)["summary"], None))
        for method, params in methods.items():
            run_dir = args.out / f"{name}_{method}"
            t0 = time.perf_counter()
            run_method(get_method(method), {"particles": str(ds_dir / "particles.star"), "threads": args.threads,
                                            "overwrite": True, **params}, run_dir)
            seconds = time.perf_counter() - t0
            result = score_run(run_dir, ds_dir)
            (run_dir / "score.json").write_text(json.dumps(result["summary"], indent=1, default=float))
            lines.append(row(name, method, result["summary"], seconds))
            print(lines[-1], flush=True)
    print("\n| dataset | method | latent vs truth | k-NN overlap | per-image FSC AUC | time (s) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
