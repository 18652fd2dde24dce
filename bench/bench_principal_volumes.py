"""Benchmark of ``cryohet principal-volumes`` (docs/benchmarks/principal_volumes.md).

    python bench/bench_principal_volumes.py accuracy --out /tmp/bench-pv
    python bench/bench_principal_volumes.py scaling  --out /tmp/bench-pv [--boxes 32 64 128]
    python bench/bench_principal_volumes.py aspire   --out /tmp/bench-pv [--aspire-python /work/aspire-venv/bin/python]

accuracy: hinge benchmark (cryohet.validation.datasets), principal angles of the estimated subspace to the PCA of
the true maps (band-limited as the estimate), the validation suite's scores (|Spearman| of PC1 vs τ, k-NN
overlap, per-image FSC to the true map), time. scaling: time per EM iteration and peak memory (RSS of a child
process) as the box grows, at Nyquist and at a fixed 10 Å limit. aspire: the same small-box data through
ASPIRE's CovarianceEstimator (FBBasis3D, MeanEstimator, eigs, src_wiener_coords) in its own virtual
environment, errors and times side by side. Each writes ``<out>/<name>.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import itertools
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


def true_pca(ds, resolution_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Population-weighted mean, principal directions (rows) and eigenvalues of the band-limited true maps."""
    from cryohet.inference.ppca import band_limit
    from cryohet.io.mrc import read_map

    maps = np.stack([read_map(p)[0] for p in ds.map_paths]).astype(np.float64)
    maps = band_limit(maps, ds.apix, resolution_A).astype(np.float64)
    w = np.bincount(ds.state, minlength=ds.n_states) / ds.n_particles
    mean = np.tensordot(w, maps, 1)
    _, s, vt = np.linalg.svd((maps - mean).reshape(len(maps), -1) * np.sqrt(w)[:, None], full_matrices=False)
    return mean, vt, s**2


def run_pv(star: Path, out: Path, **params) -> tuple[float, dict]:
    from cryohet.methods.principal_volumes import METHOD
    from cryohet.runner import run_method

    t = time.time()
    run_method(METHOD, {"particles": str(star), "overwrite": True, **params}, out)
    return time.time() - t, json.loads((out / "cryohet_run.json").read_text())


def accuracy(out: Path, n_particles: int, snrs: list[float], box: int, K: int, res_A: float) -> list[dict]:
    from cryohet.inference.ppca import subspace_sines
    from cryohet.io.mrc import read_map
    from cryohet.validation.datasets import load_dataset, make_dataset
    from cryohet.validation.score import score_run

    rows = []
    for snr in snrs:
        droot = out / f"hinge_b{box}_snr{snr:g}"
        ds = load_dataset(droot) if (droot / "particles.star").exists() else \
            make_dataset("hinge", droot, box=box, n_particles=n_particles, snr=snr, seed=1)
        run_dir = out / f"pv_b{box}_snr{snr:g}"
        secs, rec = run_pv(ds.particles_star, run_dir, n_components=K, resolution_A=res_A, movie_frames=3)
        comps = np.stack([read_map(run_dir / f"component_{k + 1:02d}.mrc")[0] for k in range(K)])
        lim = next(o["meta"]["resolution_A"] for o in rec["outputs"] if o["path"] == "mean.mrc")
        _, vt, lam = true_pca(ds, lim)
        sc = score_run(run_dir, ds.root)
        s = sc["summary"]
        rows.append({"snr": snr, "box": box, "n": n_particles, "K": K, "limit_A": round(lim, 2), "seconds": secs,
                     "sine_top1": float(subspace_sines(comps[:1], vt[:1])[0]),
                     "sines_top2": [float(x) for x in subspace_sines(comps[:2], vt[:2])] if K >= 2 else None,
                     "true_eig_fraction_top1": float(lam[0] / lam.sum()),
                     "spearman_pc1": s.get("latent_score"), "knn_overlap": s.get("knn_overlap"),
                     "latent_chance": s.get("latent_chance"), "fsc_auc": s.get("fsc_auc"),
                     "res_0.5_A": s.get("res_0.5_A"), "mean_map_fsc_auc": s.get("mean_map_fsc_auc"),
                     "chance_fsc_auc": s.get("chance_fsc_auc")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from cryohet.inference.ppca import fit_principal_volumes
from cryohet.io.particles import load_particles
import torch
torch.set_num_threads({threads})
p = load_particles({star!r})
t = time.time()
r = fit_principal_volumes(p, {K}, resolution_A={res}, max_iter={iters}, tol=0.0, warmup_iter=1)
el = time.time() - t
print(json.dumps({{"seconds": el, "per_iter": [h["seconds"] for h in r.history], "work_box": r.work_box,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def scaling(out: Path, boxes: list[int], n_particles: int, K: int, iters: int, threads: int) -> list[dict]:
    from cryohet.validation.datasets import load_dataset, make_dataset

    rows = []
    for box in boxes:
        droot = out / f"scale_hinge_b{box}"
        ds = load_dataset(droot) if (droot / "particles.star").exists() else \
            make_dataset("hinge", droot, box=box, n_particles=n_particles, snr=0.1, seed=2)
        for res in (0.0, 10.0):
            code = _CHILD.format(repo=str(REPO), threads=threads, star=str(ds.particles_star), K=K, res=res,
                                 iters=iters)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"box": box, "limit_A": res, "error": proc.stderr[-2000:]})
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                it = r["per_iter"]
                rows.append({"box": box, "apix": ds.apix, "n": n_particles, "K": K, "limit_A": res or 2 * ds.apix,
                             "work_box": r["work_box"], "total_s": r["seconds"],
                             "s_per_iter": float(np.median(it)), "peak_rss_mb": r["peak_rss_mb"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


ASPIRE_SCRIPT = r'''
import json, resource, sys, time
import numpy as np
star, out, K = sys.argv[1], sys.argv[2], int(sys.argv[3])
from aspire.basis import FBBasis3D
from aspire.covariance import CovarianceEstimator
from aspire.denoising import src_wiener_coords
from aspire.noise import WhiteNoiseEstimator
from aspire.reconstruction import MeanEstimator
from aspire.source import RelionSource
from aspire.utils import eigs
t0 = time.time()
src = RelionSource(star, dtype=np.float64)
L = src.L
basis = FBBasis3D((L, L, L), dtype=np.float64)
mean_estimator = MeanEstimator(src, basis=basis)
mean_est = mean_estimator.estimate()
noise_variance = WhiteNoiseEstimator(src, batch_size=500).estimate()
cov = CovarianceEstimator(src, basis, mean_kernel=mean_estimator.kernel)
covar_est = cov.estimate(mean_est, noise_variance)
eigs_est, lambdas_est = eigs(covar_est, K)
eigvols = np.moveaxis(np.asarray(eigs_est), -1, 0)        # (L, L, L, K) -> (K, L, L, L)
el = time.time() - t0  # the estimate of the mean and principal volumes
from aspire.volume import Volume
try:
    coords = np.asarray(src_wiener_coords(src, mean_est, Volume(eigvols), lambdas_est, noise_variance)).T
    coords_error = ""
except Exception as exc:  # ASPIRE 0.14.3 fails here on RelionSource CTFs (CTFFilter needs pixel_size)
    coords, coords_error = np.zeros((0, K)), f"{type(exc).__name__}: {exc}"
lam = np.asarray(lambdas_est)
lam = np.diag(lam) if lam.ndim == 2 else lam
np.savez(out, mean=mean_est.asnumpy()[0], eigvols=eigvols, lambdas=lam, coords=coords, coords_error=coords_error,
         seconds=el, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"seconds": el, "L": L}))
'''


def _best_orientation_sine(est: np.ndarray, truth_dirs: np.ndarray) -> tuple[float, str]:
    """Smallest principal-angle sine of ``est`` (k, L, L, L) to ``truth_dirs`` (k, L³) over the 48 axis
    permutations and flips (ASPIRE's array axes and handedness differ from RELION's (z, y, x))."""
    from cryohet.inference.ppca import subspace_sines

    best, how = 2.0, ""
    for perm in itertools.permutations((1, 2, 3)):
        for flips in itertools.product((False, True), repeat=3):
            v = np.transpose(est, (0,) + perm)
            for ax, f in zip((1, 2, 3), flips, strict=True):
                if f:
                    v = np.flip(v, ax)
            s = float(subspace_sines(np.ascontiguousarray(v).reshape(len(v), -1), truth_dirs)[0])
            if s < best:
                best, how = s, f"perm {perm} flips {flips}"
    return best, how


def aspire(out: Path, box: int, n_particles: int, snr: float, K: int, aspire_python: str) -> dict:
    from scipy.stats import spearmanr

    from cryohet.inference.ppca import fit_principal_volumes, subspace_sines
    from cryohet.io.particles import load_particles
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import hinge_conformations
    from cryohet.simulate.simulate import simulate_particles
    from cryohet.validation.datasets import BenchmarkDataset

    apix = 100.0 / box  # a 100 Å field of view around the 70 Å molecule
    droot = out / f"aspire_hinge_b{box}"
    conf = hinge_conformations(default_molecule(), n_states=20, max_angle_deg=50.0, box=box, apix=apix,
                               resolution_A=max(8.0, 2.5 * apix))
    sim = simulate_particles(conf, droot, n_particles, snr, seed=5, shift_sigma_A=0.0)
    gt = np.load(sim.ground_truth)
    tau = gt["tau"][:, 0]
    ds = BenchmarkDataset(droot, "hinge", "continuous", gt["state"], gt["tau"], conf.tau, gt["populations"],
                          sim.map_paths, box, apix)
    _, vt, lam = true_pca(ds, 0.0)
    row: dict = {"box": box, "n": n_particles, "snr": snr, "K": K, "apix": apix}

    t = time.time()
    r = fit_principal_volumes(load_particles(sim.particles_star), K, resolution_A=0.0, seed=0)
    row["cryohet_seconds"] = time.time() - t
    row["cryohet_sine_top1"] = float(subspace_sines(r.components[:1], vt[:1])[0])
    row["cryohet_sines_topK"] = [float(x) for x in subspace_sines(r.components, vt[:K])]
    row["cryohet_spearman_b1"] = float(abs(spearmanr(r.latents[:, 0], tau).correlation))

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "aspire_cov.py"
        script.write_text(ASPIRE_SCRIPT)
        res_path = droot / "aspire_result.npz"  # kept: ASPIRE's estimate takes minutes
        t = time.time()
        proc = subprocess.run([aspire_python, str(script), str(sim.particles_star), str(res_path), str(K)],
                              capture_output=True, text=True, cwd=tmp)
        row["aspire_wall_seconds"] = time.time() - t
        if proc.returncode != 0:
            row["aspire_error"] = proc.stderr[-3000:]
            print(json.dumps(row), flush=True)
            return row
        a = np.load(res_path)
        ev = np.asarray(a["eigvols"])
        ev = ev.reshape((-1,) + (box,) * 3)[:K]
        row["aspire_seconds"] = float(a["seconds"])
        row["aspire_peak_rss_mb"] = float(a["peak_rss_mb"])
        s1, how = _best_orientation_sine(ev[:1], vt[:1])
        row["aspire_sine_top1"], row["aspire_orientation"] = s1, how
        row["aspire_sines_topK"] = float(_best_orientation_sine(ev, vt[:K])[0])
        coords = np.asarray(a["coords"])
        if len(coords) == n_particles:
            row["aspire_spearman_b1"] = float(abs(spearmanr(coords[:, 0], tau).correlation))
        else:
            row["aspire_coords_error"] = str(a["coords_error"])
    row["ratio_sine_top1_cryohet_over_aspire"] = row["cryohet_sine_top1"] / max(row["aspire_sine_top1"], 1e-12)
    row["ratio_time_cryohet_over_aspire"] = row["cryohet_seconds"] / row["aspire_seconds"]
    row["true_eigenvalue_fractions"] = (lam[:K] / lam.sum()).round(4).tolist()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("accuracy", "scaling", "aspire"))
    ap.add_argument("--out", default="/tmp/cryohet-bench-pv")
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--boxes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--snr", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--res", type=float, default=10.0, help="resolution limit, Å (accuracy)")
    ap.add_argument("--iters", type=int, default=4, help="EM iterations timed (scaling)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aspire-python", default="/work/aspire-venv/bin/python")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "accuracy":
        res = accuracy(out, a.n, a.snr, a.box, a.K, a.res)
    elif a.what == "scaling":
        res = scaling(out, a.boxes, a.n, a.K, a.iters, a.threads)
    else:
        res = aspire(out, a.box, a.n, a.snr[0], a.K, a.aspire_python)
    (out / f"{a.what}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
