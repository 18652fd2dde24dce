"""Junk detection per method: AUC of cryohetFitZ per junk kind and where the 2 % rare state lands.

    .venv/bin/python bench/bench_outliers.py --out /tmp/bench_outliers --box 64 --n 2000 --epochs 20

Builds ``cryohet benchmark-make --dataset junk`` (the open adenylate kinase, a 2 % rare closed state, 10 % junk:
pure noise, another molecule, off-centre particles), runs each method through its description (the code path of
``cryohet <method>``) and compares each particle's score with the truth (``cryohet.validation.outliers``). Side
by side with the per-particle scores a user has today: RELION-style ``rlnLogLikeliContribution`` of classify (the
higher the better, so its negative is ranked) and the residual χ² z-score ``cryohetResidualZ``. Prints the
Markdown table kept in docs/benchmarks.md: AUC of junk against good particles (1: every junk image worse than every
good one; 0.5: chance), median scores, and the rare state's median rank from the worst (0.1: at the 10 % cut).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.io.star import read_star  # noqa: E402
from cryohet.methods import get_method  # noqa: E402
from cryohet.runner import run_method  # noqa: E402
from cryohet.simulate.junk import JUNK_KINDS  # noqa: E402
from cryohet.validation.datasets import make_dataset  # noqa: E402
from cryohet.validation.outliers import outlier_report  # noqa: E402


def row(method: str, score: str, rep, seconds: float | None) -> str:
    t = f"{seconds:.0f}" if seconds is not None else "–"
    auc = " | ".join(f"{rep.auc[k]:.3f}" for k in (*JUNK_KINDS, "all"))
    med = rep.median
    return (f"| {method} | {score} | {auc} | {med['good']:.2f} / {med['rare']:.2f} / "
            f"{med['noise']:.2f} / {med['other_molecule']:.2f} / {med['off_centre']:.2f} | {rep.rare_rank:.2f} | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_outliers"))
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=20, help="train-vae and train-gmm epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+",
                    default=["reconstruct", "principal-volumes", "classify", "train-vae", "train-gmm"])
    args = ap.parse_args()
    ds_dir = args.out / "junk"
    if not (ds_dir / "benchmark.json").exists():
        make_dataset("junk", ds_dir, box=args.box, n_particles=args.n, snr=args.snr)
    with np.load(ds_dir / "ground_truth.npz") as gt:
        junk, state = gt["junk"], gt["state"]
    print(f"{args.n} particles, box {args.box}, SNR {args.snr}: {int((junk > 0).sum())} junk "
          f"({', '.join(f'{k} {int((junk == i + 1).sum())}' for i, k in enumerate(JUNK_KINDS))}), "
          f"{int(((junk == 0) & (state == 1)).sum())} of the rare state", flush=True)
    star = str(ds_dir / "particles.star")
    params = {"reconstruct": {}, "principal-volumes": {"n_components": 2}, "classify": {"K": 3},
              "train-vae": {"epochs": args.epochs},
              "train-gmm": {"epochs": args.epochs, "halfsets": False, "n_maps": 2, "n_clusters": 0,
                            "consensus_map": str(args.out / "reconstruct" / "map.mrc")}}
    lines = []
    for method in args.methods:
        run_dir = args.out / method
        t0 = time.perf_counter()
        run_method(get_method(method), {"particles": star, "threads": args.threads, "overwrite": True,
                                        **params[method]}, run_dir)
        seconds = time.perf_counter() - t0
        table = read_star(run_dir / "particles.star")["particles"]
        scores = {"cryohetFitZ": table["cryohetFitZ"], "cryohetResidualZ": table["cryohetResidualZ"]}
        if "rlnLogLikeliContribution" in table:
            scores["−rlnLogLikeliContribution"] = -table["rlnLogLikeliContribution"]
        for name, values in scores.items():
            rep = outlier_report(values.to_numpy(np.float64), junk, state, 1, JUNK_KINDS)
            lines.append(row(method, name, rep, seconds if name == "cryohetFitZ" else None))
            print(lines[-1], flush=True)
    print(f"\n| method | score | AUC {' | AUC '.join(JUNK_KINDS)} | AUC all junk | median good / rare / "
          f"{' / '.join(JUNK_KINDS)} | rare state's median rank from the worst | time (s) |")
    print("|---|---|" + "---|" * (len(JUNK_KINDS) + 4))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
