"""The principal-volumes mean against homogeneous reconstructions of the same particles, shell by shell.

    python bench/bench_ppca_mean.py --data /tmp/ppm/data --out /tmp/ppm/bench [--K 3] [--resolutions 10 0]
        [--max_iter 30 5]
    python bench/bench_ppca_mean.py --data /tmp/ppm/data --out /tmp/ppm/rec --resolutions   # the reconstructions only

``--data``: a ``cryohet benchmark-make`` dataset (e.g. ``--dataset interpolation --box 64 --n_particles 2000
--snr 0.1``). On the same particles: ``cryohet reconstruct`` (Wiener filter from the half-map FSC, and
``--wiener none``), ``relion_reconstruct --ctf`` (on PATH) and ``principal-volumes`` at each ``--resolutions``
limit (none: the reconstructions only). Each map's FSC
to the true mean map (the true maps weighted by their particle counts) at chosen shells, the resolution where
that FSC falls to 0.5, its least difference to relion_reconstruct's over the shells where that is above
0.143, the per-image FSC AUC of each map used for every particle (and of principal-volumes' own
per-particle maps), principal-volumes' latents (|Spearman| of PC1, 5-fold k-NN R² of the true τ) and the wall
times; ratios against ``cryohet reconstruct``. Writes ``<out>/ppca_mean.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")


def true_mean(ds) -> np.ndarray:
    """The true maps weighted by how many of the particles are in each state."""
    from cryohet.io.mrc import read_map

    w = np.bincount(ds.state, minlength=ds.n_states) / ds.n_particles
    return sum(float(w[s]) * read_map(p)[0].astype(np.float64) for s, p in enumerate(ds.map_paths) if w[s] > 0)


def run_method(name: str, params: dict, out: Path, reuse: bool = False) -> float:
    """Run ``name`` into ``out``; wall seconds. ``reuse``: a finished run already there is kept (its own times)."""
    from cryohet.methods import get_method
    from cryohet.runner import run_method as run

    record = out / "cryohet_run.json"
    if reuse and record.is_file():
        rec = json.loads(record.read_text())
        if rec.get("status") == "finished" and rec.get("method") == name:
            return float(rec["finished"] - rec["started"])
    t = time.time()
    run(get_method(name), {"overwrite": True, "threads": 1, "device": "cpu", **params}, out)
    return time.time() - t


def relion(star: Path, out: Path, apix: float) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(out / "relion.mrc"), "--ctf",
                    "--angpix", f"{apix}"], cwd=star.parent, check=True, capture_output=True)
    return time.time() - t


def res_at(curve: np.ndarray, box: int, apix: float, threshold: float) -> float:
    from cryohet.reconstruct.fsc import resolution_at

    return float(resolution_at(curve, box, apix, threshold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="keep finished runs already in --out (their own times)")
    ap.add_argument("--resolutions", type=float, nargs="*", default=[10.0, 0.0])
    ap.add_argument("--max_iter", type=int, nargs="+", default=[30],
                    help="EM iterations at each --resolutions limit (one value: the same for all)")
    a = ap.parse_args()
    import torch

    from cryohet.io.mrc import read_map
    from cryohet.reconstruct.fsc import fsc
    from cryohet.validation.datasets import load_dataset
    from cryohet.validation.score import score, score_run
    from cryohet.validation.sources import ParticleVolumes

    torch.set_num_threads(1)
    ds = load_dataset(a.data)
    a.out.mkdir(parents=True, exist_ok=True)
    truth = true_mean(ds)
    star = ds.particles_star
    maps: dict[str, Path] = {}
    secs: dict[str, float] = {}
    secs["cryohet reconstruct"] = run_method("reconstruct", {"particles": str(star)}, a.out / "reconstruct",
                                             a.reuse)
    maps["cryohet reconstruct"] = a.out / "reconstruct" / "map.mrc"
    secs["cryohet reconstruct --wiener none"] = run_method("reconstruct", {"particles": str(star), "wiener": "none"},
                                                           a.out / "reconstruct_none", a.reuse)
    maps["cryohet reconstruct --wiener none"] = a.out / "reconstruct_none" / "map.mrc"
    if shutil.which("relion_reconstruct"):
        secs["relion_reconstruct"] = relion(star, a.out / "relion", ds.apix)
        maps["relion_reconstruct"] = a.out / "relion" / "relion.mrc"
    latents: dict[str, dict] = {}
    per_image: dict[str, float] = {}
    iters = a.max_iter * len(a.resolutions) if len(a.max_iter) == 1 else a.max_iter
    for res, max_iter in zip(a.resolutions, iters, strict=True):
        label = f"principal-volumes {res:g} Å" if res else "principal-volumes Nyquist"
        d = a.out / f"pv_{res:g}"
        secs[label] = run_method("principal-volumes", {"particles": str(star), "n_components": a.K,
                                                       "resolution_A": res, "max_iter": max_iter,
                                                       "movie_frames": 2}, d, a.reuse)
        maps[label + " (mean)"] = d / "mean.mrc"
        sc = score_run(d, ds.root)
        latents[label] = {"spearman_pc1": sc["latent"]["metrics"].get("spearman_pc1"),
                          "knn_r2": sc["latent"]["metrics"].get("knn_r2")}
        per_image[label + " (per-particle maps)"] = sc["summary"]["fsc_auc"]
    rows = []
    freq = np.arange(ds.box // 2 + 1) / (ds.box * ds.apix)
    for label, path in maps.items():
        vol = read_map(path)[0]
        curve = fsc(torch.as_tensor(vol, dtype=torch.float64), torch.as_tensor(truth))
        auc = score(ds, None, ParticleVolumes.from_labels([path], np.zeros(ds.n_particles, int)),
                    label=label)["summary"]["fsc_auc"]
        per_image[label] = auc
        rows.append({"map": label, "fsc_to_true_mean": [float(x) for x in curve],
                     "res_0.5_A": res_at(curve, ds.box, ds.apix, 0.5), "per_image_fsc_auc": auc,
                     "seconds": secs.get(label.replace(" (mean)", ""))})
    result = {"dataset": str(ds.root), "n": ds.n_particles, "box": ds.box, "apix": ds.apix, "K": a.K,
              "freq_per_A": freq.tolist(), "maps": rows, "latents": latents, "per_image_fsc_auc": per_image,
              "seconds": secs}
    shells = [s for s in (4, 8, 12, 16, 18, 19, 20, 21, 24, 28) if s <= ds.box // 2]
    ref = next(r for r in rows if r["map"] == "cryohet reconstruct")
    rel = next((np.array(r["fsc_to_true_mean"]) for r in rows if r["map"] == "relion_reconstruct"), None)
    for r in rows:
        if rel is not None:
            d = np.array(r["fsc_to_true_mean"]) - rel
            ok = np.flatnonzero(rel > 0.143)
            r["min_minus_relion"], r["at_shell"] = float(d[ok].min()), int(ok[d[ok].argmin()])
    (a.out / "ppca_mean.json").write_text(json.dumps(result, indent=1))
    print(f"\nFSC to the true mean map ({ds.n_particles} particles, box {ds.box}, {ds.apix:.3g} Å/px); "
          "per-image FSC AUC of the map used for every particle; time")
    print("| map | " + " | ".join(f"{1 / freq[s]:.1f} Å" for s in shells) + " | FSC 0.5 | least FSC − RELION's "
          "(shell) | per-image AUC | AUC / reconstruct's | s |")
    print("|---|" + "---|" * (len(shells) + 5))
    for r in rows:
        c = r["fsc_to_true_mean"]
        least = f"{r['min_minus_relion']:+.3f} ({1 / freq[r['at_shell']]:.1f} Å)" if "at_shell" in r else "-"
        print(f"| {r['map']} | " + " | ".join(f"{c[s]:.3f}" for s in shells)
              + f" | {r['res_0.5_A']:.2f} Å | {least} | {r['per_image_fsc_auc']:.3f} | "
              f"{r['per_image_fsc_auc'] / ref['per_image_fsc_auc']:.3f} | {r['seconds'] or 0:.0f} |")
    if not latents:
        return
    print("\n| principal-volumes | |Spearman| PC1 | k-NN R² | per-image FSC AUC (its maps) | s |")
    print("|---|---|---|---|---|")
    for label, lat in latents.items():
        print(f"| {label} | {lat['spearman_pc1']:.3f} | {lat['knn_r2']:.3f} | "
              f"{per_image[label + ' (per-particle maps)']:.3f} | {secs[label]:.0f} |")


if __name__ == "__main__":
    main()
