"""Manifold methods side by side: the conformational coordinate of `cryohet manifold-images` (ManifoldEM class) and
`cryohet manifold-volumes` (AlphaCryo4D class) against the latents of `principal-volumes` and `train-vae`, on the
same particles with a known motion and a known, non-uniform population.

    .venv/bin/python bench/bench_manifolds.py --out /tmp/bench_manifolds                      # 2000 images
    .venv/bin/python bench/bench_manifolds.py --out /tmp/bench_manifolds20k --n 20000 --no_vae

Data as ``bench/bench_kernel_volumes.py`` (``benchmark-make --dataset hinge``, box 64, SNR 0.1, two wells over
20 states). Rows, each a whole command at its defaults unless named:

* ``principal-volumes``, ``train-vae`` (``--no_vae`` skips it);
* ``manifold-images --refine_rounds 0`` (the directions' diffusion maps alone, as ManifoldEM) and at its
  defaults (two refinement rounds across directions);
* ``manifold-volumes`` from bootstrap classifications, and on principal-volumes' latents;
* ``kernel-volumes`` on manifold-images' coordinate (10 points), scored by per-image FSC AUC.

Scores: |Spearman| between the true τ and the latents' first principal component (a 1-D coordinate as it is);
the free energy of each true state from ``cryohet landscape --dims 1 --path_maps no`` on each row's latents
(its per-particle ``cryohetFreeEnergy``), against −log of the true population: population-weighted RMS in kT after
the best offset (``energy_rms``; a flat landscape is printed for reference). Writes ``results.json`` and prints
Markdown tables.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel_volumes import data_arguments, energy_rms, make_data, score, step  # noqa: E402  (beside it)

from cryohet.analysis.runs import load_latents  # noqa: E402


def first_pc(z: np.ndarray) -> np.ndarray:
    z = z.reshape(len(z), -1).astype(np.float64)
    if z.shape[1] == 1:
        return z[:, 0]
    zc = z - z.mean(0)
    return zc @ np.linalg.svd(zc, full_matrices=False)[2][0]


def main() -> None:
    ap = data_arguments(__doc__)
    ap.add_argument("--no_vae", action="store_true", help="no train-vae row")
    ap.add_argument("--no_volumes", action="store_true", help="no manifold-volumes rows")
    ap.add_argument("--no_kernel", action="store_true", help="no kernel-volumes row")
    a = ap.parse_args()
    out, data = make_data(a)
    star = str(data / "particles.star")
    truth = np.load(data / "ground_truth.npz")
    tau, state = truth["tau"].ravel(), truth["state"].ravel()

    runs = {
        "principal-volumes": ["principal-volumes", "--particles", star],
        "manifold-images (no refinement)": ["manifold-images", "--particles", star, "--refine_rounds", "0",
                                            "--n_frames", "0"],
        "manifold-images": ["manifold-images", "--particles", star, "--n_frames", "0"],
        "train-vae": ["train-vae", "--particles", star],
        "manifold-volumes (bootstrap classes)": ["manifold-volumes", "--particles", star],
        "manifold-volumes (principal-volumes latents)": ["manifold-volumes", "--run", str(out / "run_pv")],
    }
    folders = {"principal-volumes": "run_pv", "manifold-images (no refinement)": "run_mi0",
               "manifold-images": "run_mi", "train-vae": "run_vae",
               "manifold-volumes (bootstrap classes)": "run_mv", "manifold-volumes (principal-volumes latents)":
               "run_mv_pv"}
    skip = ({"train-vae"} if a.no_vae else set()) | ({k for k in runs if k.startswith("manifold-volumes")}
                                                     if a.no_volumes else set())
    folders = {k: v for k, v in folders.items() if k not in skip}
    costs = {k: step(out, folders[k], runs[k], a.threads) for k in folders}

    rows = {}
    for k, folder in folders.items():
        z, _ = load_latents(out / folder)
        ls = f"landscape_{folder}"
        step(out, ls, ["landscape", "--run", str(out / folder), "--dims", "1", "--path_maps", "no",
                       "--bootstrap", "0"], a.threads)
        energy = np.load(out / ls / "free_energy.npy")[:, 0]
        rows[k] = {"spearman": float(abs(spearmanr(first_pc(z), tau).correlation)),
                   "energy_rms_kT": energy_rms(energy, state),
                   "cost": asdict(costs[k]) if costs.get(k) else None}
    result = {"settings": vars(a) | {"out": str(out)}, "rows": rows,
              "flat_energy_rms_kT": energy_rms(np.zeros(len(state)), state)}
    if not a.no_kernel:
        kv_cost = step(out, "kernel_mi", ["kernel-volumes", "--run", str(out / folders["manifold-images"])],
                       a.threads)
        kv = score(out, data, "kernel_mi", ["--run", str(out / "kernel_mi")])
        result["kernel-volumes (manifold-images coordinate)"] = {"score": kv,
                                                                 "cost": asdict(kv_cost) if kv_cost else None}
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for k, v in rows.items():  # keep the costs measured when a step really ran
        if v["cost"] is None and previous.get("rows", {}).get(k, {}).get("cost"):
            v["cost"] = previous["rows"][k]["cost"]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"{len(tau)} particles, box {a.box}, SNR {a.snr}\n")
    print("| latents | |Spearman| with true τ | free-energy RMS (kT) | wall (s) | peak (GB) |\n|---|---|---|---|---|")
    for k, v in rows.items():
        c = v["cost"]
        cost = f"{c['wall_s']:.0f} | {c['peak_gb']:.2f}" if c else "– | –"
        print(f"| {k} | {v['spearman']:.3f} | {v['energy_rms_kT']:.2f} | {cost} |")
    print(f"| flat landscape | – | {result['flat_energy_rms_kT']:.2f} | – | – |")
    if not a.no_kernel:
        print(f"\nkernel-volumes on manifold-images' coordinate: per-image FSC AUC {kv['fsc_auc']:.3f}")


if __name__ == "__main__":
    main()
