"""Benchmark of ``cryohet moments`` beside ``cryohet principal-volumes`` and ASPIRE's covariance estimator.

    python bench/bench_moments.py accuracy --out /tmp/bench-moments [--n 500 3000] [--snr 1 0.1 0.01]
    python bench/bench_moments.py accuracy --out /tmp/bench-shrink --snr 0.1 0.01 --shrinkage none operator \
        frobenius --no-pv
    python bench/bench_moments.py aspire   --out /tmp/bench-moments [--aspire-python /tmp/aspire-venv/bin/python]

accuracy: hinge (box 32, 3 Å/px, CTF) at each SNR and particle count; both methods at the same resolution limit
(--res), each in a child process (wall time, peak RSS). Scores against the truth: sines of the principal angles
between the estimated components and the top eigenvectors of the true maps' covariance (band-limited as the
estimate; weighted by the particles' states), the first eigenvalue over the true one (in the images' units),
|Spearman| of b_1 with the hinge angle, and the mean map's FSC to the true mean (resolution at FSC 0.5).
--shrinkage: one moments run per eigenvalue shrinkage (``moments_<shrinker>`` columns; ``none`` is ``moments``);
--no-pv: moments only. aspire: the small-box data of bench_principal_volumes (box 10) through the three
estimators. Each writes ``<out>/<name>.json`` and prints a Markdown table with the ratios moments /
principal-volumes (and / ASPIRE).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

_CHILD = r"""
import json, resource, sys, time, importlib
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from cryohet.runner import run_method
method = importlib.import_module("cryohet.methods." + {module!r}).METHOD
t = time.time()
run_method(method, {params!r}, {out!r})
# VmHWM: the peak of this process's own memory (ru_maxrss keeps the forking parent's peak across exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = float(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": time.time() - t, "peak_rss_mb": peak}}))
"""


def run_child(module: str, params: dict, out: Path, threads: int) -> dict:
    """Run a method in a child process: its wall seconds and peak resident memory (MB), or the error."""
    code = _CHILD.format(repo=str(REPO), threads=threads, module=module, params={**params, "overwrite": True},
                         out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def simulate(root: Path, box: int, apix: float, n: int, snr: float, seed: int):
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import hinge_conformations
    from cryohet.simulate.simulate import simulate_particles

    conf = hinge_conformations(default_molecule(), n_states=20, max_angle_deg=50.0, box=box, apix=apix,
                               resolution_A=max(8.0, 2.5 * apix))
    sim = simulate_particles(conf, root, n, snr, seed=seed)
    return conf, sim, np.load(sim.ground_truth)


def score(run_dir: Path, conf, truth, K: int) -> dict:
    """Scores of a run with a linear model against the simulation's truth."""
    from scipy.stats import spearmanr

    from cryohet.inference.ppca import subspace_sines
    from cryohet.io.mrc import read_map
    from cryohet.models.base import load_volume_model
    from cryohet.reconstruct.fsc import fsc, resolution_at
    from cryohet.validation.true_covariance import true_covariance

    model = load_volume_model(run_dir)
    lim = float(model.info["resolution_A"])
    _, vt, lam = true_covariance(conf.maps, truth["state"], conf.apix, lim)
    mean_true = true_covariance(conf.maps, truth["state"], conf.apix, 0.0)[0]
    comps = model.components.reshape(K, -1)
    z = np.load(run_dir / "latents.npy")
    curve = fsc(read_map(run_dir / "mean.mrc")[0], mean_true.astype(np.float32))
    return {"limit_A": round(lim, 2), "sine_top1": float(subspace_sines(comps[:1], vt[:1])[0]),
            "sine_topK_max": float(subspace_sines(comps, vt[:K])[0]),
            "eig1_over_true": float(model.eigenvalues[0] / (lam[0] * float(truth["image_scale"]) ** 2)),
            "spearman_b1": float(abs(spearmanr(z[:, 0], truth["tau"][:, 0]).correlation)),
            "mean_fsc05_A": float(resolution_at(np.asarray(curve), model.box, conf.apix, 0.5))}


def accuracy(out: Path, ns: list[int], snrs: list[float], K: int, res: float, threads: int,
             shrinkers: tuple[str, ...] = ("none",), pv: bool = True) -> list[dict]:
    rows = []
    runs = [("moments" if s == "none" else f"moments_{s}", "moments", {"diameter_A": 80.0, "shrinkage": s})
            for s in shrinkers] + ([("pv", "principal_volumes", {})] if pv else [])
    for n in ns:
        for snr in snrs:
            conf, sim, truth = simulate(out / f"hinge_n{n}_snr{snr:g}", 32, 3.0, n, snr, seed=7)
            row: dict = {"n": n, "snr": snr, "K": K}
            for name, module, extra in runs:
                run_dir = out / f"{name}_n{n}_snr{snr:g}"
                params = {"particles": str(sim.particles_star), "n_components": K, "resolution_A": res,
                          "movie_frames": 2, **extra}
                r = run_child(module, params, run_dir, threads)
                row.update({f"{name}_{k}": v for k, v in r.items()})
                if "error" not in r:
                    row.update({f"{name}_{k}": v for k, v in score(run_dir, conf, truth, K).items()})
            if "moments_sine_top1" in row and "pv_sine_top1" in row:
                row["ratio_sine_top1"] = row["moments_sine_top1"] / max(row["pv_sine_top1"], 1e-12)
                row["ratio_time"] = row["moments_seconds"] / row["pv_seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def aspire(out: Path, n: int, snr: float, K: int, threads: int, aspire_python: str) -> dict:
    """Box 10 (10 Å/px): the three estimators on one data set; ASPIRE as in bench_principal_volumes."""
    from bench_principal_volumes import ASPIRE_SCRIPT, _best_orientation_sine

    from cryohet.validation.true_covariance import true_covariance

    box = 10
    conf, sim, truth = simulate(out / "aspire_hinge_b10", box, 100.0 / box, n, snr, seed=5)
    row: dict = {"box": box, "n": n, "snr": snr, "K": K}
    for name, module, extra in (("moments", "moments", {"resolution_A": 20.0}),
                                ("pv", "principal_volumes", {"resolution_A": 0.0})):
        run_dir = out / f"aspire_{name}"
        r = run_child(module, {"particles": str(sim.particles_star), "n_components": K, "movie_frames": 2,
                               **extra}, run_dir, threads)
        row.update({f"{name}_{k}": v for k, v in r.items()})
        if "error" not in r:
            row.update({f"{name}_{k}": v for k, v in score(run_dir, conf, truth, K).items()})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "aspire_cov.py"
        script.write_text(ASPIRE_SCRIPT)
        res_path = out / "aspire_result.npz"
        t = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([aspire_python, str(script), str(sim.particles_star), str(res_path), str(K)],
                              capture_output=True, text=True, cwd=tmp, env=env)
        row["aspire_wall_seconds"] = time.time() - t
        if proc.returncode != 0:
            row["aspire_error"] = proc.stderr[-3000:]
        else:
            a = np.load(res_path)
            ev = np.asarray(a["eigvols"]).reshape((-1,) + (box,) * 3)[:K]
            _, vt, _ = true_covariance(conf.maps, truth["state"], conf.apix, 0.0)
            row["aspire_seconds"], row["aspire_peak_rss_mb"] = float(a["seconds"]), float(a["peak_rss_mb"])
            row["aspire_sine_top1"], row["aspire_orientation"] = _best_orientation_sine(ev[:1], vt[:1])
            row["aspire_sine_topK_max"] = _best_orientation_sine(ev, vt[:K])[0]
            row["ratio_sine_top1_moments_over_aspire"] = row.get("moments_sine_top1", np.nan) / row["aspire_sine_top1"]
            row["ratio_time_moments_over_aspire"] = row.get("moments_seconds", np.nan) / row["aspire_seconds"]
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict], keys: tuple[str, ...]) -> None:
    """A Markdown table of ``rows``' ``keys`` (floats to 3 significant digits)."""
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k, float('nan')):.3g}" if isinstance(r.get(k), float) else str(r.get(k))
                                for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("accuracy", "aspire"))
    ap.add_argument("--out", default="/tmp/bench-moments")
    ap.add_argument("--n", type=int, nargs="+", default=[500, 3000], help="particles")
    ap.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--res", type=float, default=20.0, help="resolution limit of both methods, Å (accuracy)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aspire-python", default="/tmp/aspire-venv/bin/python")
    ap.add_argument("--shrinkage", nargs="+", default=["none"], choices=("none", "operator", "frobenius"),
                    help="moments runs, one per eigenvalue shrinkage (accuracy)")
    ap.add_argument("--no-pv", action="store_true", help="leave out principal-volumes (accuracy)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "accuracy":
        rows = accuracy(out, a.n, a.snr, a.K, a.res, a.threads, tuple(a.shrinkage), not a.no_pv)
        names = [*("moments" if s == "none" else f"moments_{s}" for s in a.shrinkage), *([] if a.no_pv else ["pv"])]
        keys = ("n", "snr", *(f"{m}_{k}" for k in ("sine_top1", "sine_topK_max", "eig1_over_true", "spearman_b1",
                                                   "mean_fsc05_A", "seconds", "peak_rss_mb") for m in names),
                *(() if a.no_pv else ("ratio_sine_top1", "ratio_time")))
    else:
        rows = [aspire(out, a.n[0], a.snr[0], a.K, a.threads, a.aspire_python)]
        keys = tuple(k for k in rows[0] if not k.endswith("error"))
    (out / f"{a.what}.json").write_text(json.dumps(rows, indent=1, default=float))
    print_table(rows, keys)


if __name__ == "__main__":
    main()
