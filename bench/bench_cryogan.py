"""Benchmark of ``cryohet cryogan`` (Multi-CryoGAN, poses unknown and known) beside ``cryohet moments`` and
``cryohet principal-volumes`` on the same simulated hinge data.

    python bench/bench_cryogan.py --out /tmp/bench-cryogan [--n 1000] [--snr 1 0.1 0.01] [--steps 300]

Hinge data (box 32, 3 Å/px, CTF, 20 states, ``bench_moments.simulate``) at each SNR and particle count. Each method
runs in a child process (wall time, peak RSS): cryogan with --zdim 2 at a 12 Å working limit (24 px working box),
poses unknown and known; moments and principal-volumes with K = 2 at 20 Å. Scores against the truth: FSC of the
mean map to the true mean (resolution at FSC 0.5; the CryoGAN map with unknown poses is first superposed on the
truth by rotation and hand, ``validation.map_align``, and its components with it), its correlation with the
truth, and the sine of the angle between the first principal volume and the true covariance's top eigenvector
(band-limited to the estimate's limit), as bench_moments. Writes ``<out>/cryogan.json`` and prints a Markdown
table with the ratios CryoGAN / principal-volumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_moments import print_table, run_child, simulate  # noqa: E402


def score_maps(mean: np.ndarray, comps: np.ndarray, limit_A: float, conf, truth, align: bool) -> dict:
    """Mean map and principal volumes (K, ...) against the truth; superposed first when ``align``."""
    from cryohet.inference.ppca import subspace_sines
    from cryohet.reconstruct.fsc import fsc, resolution_at
    from cryohet.validation.map_align import superpose
    from cryohet.validation.true_covariance import true_covariance

    mean_true = true_covariance(conf.maps, truth["state"], conf.apix, 0.0)[0].astype(np.float32)
    _, vt, _ = true_covariance(conf.maps, truth["state"], conf.apix, limit_A)
    row: dict = {}
    if align:
        turned, row["mirrored"] = superpose(np.concatenate([mean[None], comps]), mean_true)
        mean, comps = turned[0], turned[1:]
    curve = fsc(mean, mean_true)
    K = len(comps)
    row.update({"mean_fsc05_A": float(resolution_at(np.asarray(curve), mean.shape[-1], conf.apix, 0.5)),
                "mean_corr": float(np.corrcoef(mean.ravel(), mean_true.ravel())[0, 1]),
                "sine_top1": float(subspace_sines(comps.reshape(K, -1)[:1], vt[:1])[0])})
    return row


def score_run(run_dir: Path, conf, truth, align: bool) -> dict:
    from cryohet.models.base import load_volume_model

    model = load_volume_model(run_dir)
    return score_maps(model.mean, model.components, float(model.info["resolution_A"]), conf, truth, align)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench-cryogan")
    ap.add_argument("--n", type=int, nargs="+", default=[1000], help="particles")
    ap.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    ap.add_argument("--steps", type=int, default=300, help="CryoGAN generator steps")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.n:
        for snr in a.snr:
            conf, sim, truth = simulate(out / f"hinge_n{n}_snr{snr:g}", 32, 3.0, n, snr, seed=7)
            row: dict = {"n": n, "snr": snr}
            runs = (("gan_unknown", "cryogan", {"zdim": 2, "poses": "unknown", "steps": a.steps,
                                                "resolution_A": 12.0, "movie_frames": 2}, True),
                    ("gan_known", "cryogan", {"zdim": 2, "poses": "known", "steps": a.steps, "resolution_A": 12.0,
                                              "movie_frames": 2}, False),
                    ("moments", "moments", {"n_components": 2, "resolution_A": 20.0, "diameter_A": 80.0,
                                            "movie_frames": 2}, False),
                    ("pv", "principal_volumes", {"n_components": 2, "resolution_A": 20.0, "movie_frames": 2},
                     False))
            for name, module, params, align in runs:
                run_dir = out / f"{name}_n{n}_snr{snr:g}"
                r = run_child(module, {"particles": str(sim.particles_star), "threads": a.threads, **params}, run_dir,
                              a.threads)
                row.update({f"{name}_{k}": v for k, v in r.items()})
                if "error" not in r:
                    row.update({f"{name}_{k}": v for k, v in score_run(run_dir, conf, truth, align).items()})
            for name in ("gan_unknown", "gan_known"):
                if f"{name}_sine_top1" in row and "pv_sine_top1" in row:
                    row[f"ratio_time_{name}_over_pv"] = row[f"{name}_seconds"] / row["pv_seconds"]
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
    (out / "cryogan.json").write_text(json.dumps(rows, indent=1, default=float))
    keys = ("n", "snr", "gan_unknown_mean_fsc05_A", "gan_known_mean_fsc05_A", "moments_mean_fsc05_A",
            "pv_mean_fsc05_A", "gan_unknown_mean_corr", "gan_known_mean_corr", "gan_unknown_sine_top1",
            "gan_known_sine_top1", "moments_sine_top1", "pv_sine_top1", "gan_unknown_seconds", "gan_known_seconds",
            "moments_seconds", "pv_seconds", "ratio_time_gan_unknown_over_pv", "gan_unknown_peak_rss_mb",
            "moments_peak_rss_mb", "pv_peak_rss_mb")
    print_table(rows, keys)


if __name__ == "__main__":
    main()
