"""Benchmark of ``cryohet moments --poses uniform`` (the map from three invariant moments, poses unknown) beside
``cryohet abinit`` on the same homogeneous data, and of its low-rank model (K = 1) on the hinge beside the
known-pose estimator (``moments --poses known``).

    python bench/bench_moments_uniform.py homogeneous --out /tmp/bench-mom-uniform [--n 1000] [--snr 1 0.1 0.01]
    python bench/bench_moments_uniform.py hinge       --out /tmp/bench-mom-uniform [--n 2000] [--snr 1]

homogeneous: adenylate kinase (one state), box 32 at 3 Å/px, CTF, origins σ 2 Å, uniform orientations; both
programs read the STAR without angle and origin columns. Each map is superposed on the true map (best rotation,
translation and hand, ``validation.map_align``) and scored by its FSC to the truth band-limited to --res: the
resolution at FSC 0.5 and the mean FSC over the shells inside the limit; the true map's spherical average (all a
first moment gives) scored the same way is the null. hinge: the low-rank model's principal
volume (moved by the alignment of its mean) against the top eigenvector of the true maps' covariance (sine of the
angle; chance ≈ 1), and the same for ``moments --poses known`` with K = 1. Each run in a child process (wall
seconds, peak RSS). Writes ``<out>/<name>.json`` and prints Markdown rows with the ratios moments / abinit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moments import REPO, run_child  # noqa: E402

sys.path.insert(0, str(REPO))


def simulate(root: Path, n: int, snr: float, n_states: int, seed: int):
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import hinge_conformations
    from cryohet.simulate.simulate import simulate_particles

    conf = hinge_conformations(default_molecule(), n_states=n_states, max_angle_deg=50.0, box=32, apix=3.0,
                               resolution_A=8.0)
    sim = simulate_particles(conf, root, n, snr, seed=seed)
    return conf, sim, np.load(sim.ground_truth)


def without_poses(star: Path) -> Path:
    """A copy of the STAR without angle and origin columns (the pose columns dropped from every data row)."""
    from cryohet.io.star import read_star, write_star

    blocks = read_star(star)
    parts = blocks["particles"]
    drop = [c for c in parts.columns if c.startswith(("rlnAngle", "rlnOrigin"))]
    blocks["particles"] = parts.drop(columns=drop)
    out = star.with_name("particles_noposes.star")
    write_star(out, blocks)
    return out


def map_scores(vol: np.ndarray, truth: np.ndarray, res: float) -> dict:
    from cryohet.inference.ppca import band_limit
    from cryohet.reconstruct.fsc import fsc, resolution_at
    from cryohet.validation.map_align import align_map

    tb = band_limit(truth[None], 3.0, res)[0]
    vb = band_limit(vol[None], 3.0, res)[0]
    al = align_map(vb, tb)
    curve = fsc(al.aligned, tb)
    inside = int(32 * 3.0 / res)
    return {"fsc05_A": float(resolution_at(curve, 32, 3.0, 0.5)), "mean_fsc": float(curve[1:inside + 1].mean()),
            "mirrored": al.mirrored, "cc": al.correlation}


def spherical_average(vol: np.ndarray) -> np.ndarray:
    """The map averaged over rotations about its centre (what the first moment alone gives): the null score."""
    from cryohet.geometry.fourier import radius_grid

    r = np.round(radius_grid(vol.shape[-1], 3).numpy()).astype(int)
    return (np.bincount(r.ravel(), vol.ravel()) / np.bincount(r.ravel()))[r].astype(np.float32)


def homogeneous(out: Path, ns: list[int], snrs: list[float], res: float, threads: int, skip_abinit_above: int,
                fit: dict) -> list[dict]:
    """moments --poses uniform on every data set first, then abinit (up to ``skip_abinit_above`` particles)."""
    from cryohet.io.mrc import read_map

    rows, data = [], []
    for n in ns:
        for snr in snrs:
            conf, sim, _ = simulate(out / f"hom_n{n}_snr{snr:g}", n, snr, 1, seed=11)
            data.append((conf, sim, without_poses(sim.particles_star)))
            null = map_scores(spherical_average(conf.maps[0]), conf.maps[0], res)
            rows.append({"n": n, "snr": snr, **{f"spherical_{k}": v for k, v in null.items()}})
    for name, module, extra in (("moments", "moments", {"poses": "uniform", "resolution_A": res, **fit}),
                                ("abinit", "abinit", {})):
        for row, (conf, sim, star) in zip(rows, data, strict=True):
            n, snr = row["n"], row["snr"]
            if name == "abinit" and n > skip_abinit_above:
                continue
            run_dir = out / f"{name}_n{n}_snr{snr:g}"
            r = run_child(module, {"particles": str(star), "datadir": str(sim.particles_star.parent), **extra},
                          run_dir, threads)
            row.update({f"{name}_{k}": v for k, v in r.items()})
            if "error" not in r:
                s = map_scores(read_map(run_dir / "map.mrc")[0], conf.maps[0], res)
                row.update({f"{name}_{k}": v for k, v in s.items()})
            if "moments_seconds" in row and "abinit_seconds" in row:
                row["ratio_time"] = row["moments_seconds"] / row["abinit_seconds"]
                row["ratio_mean_fsc"] = row["moments_mean_fsc"] / row["abinit_mean_fsc"]
            print(json.dumps(row), flush=True)
            (out / "homogeneous.json").write_text(json.dumps(rows, indent=1))
    return rows


def hinge(out: Path, ns: list[int], snrs: list[float], res: float, threads: int, fit: dict) -> list[dict]:
    from cryohet.inference.ppca import band_limit, subspace_sines
    from cryohet.io.mrc import read_map
    from cryohet.validation.map_align import align_map, apply_alignment
    from cryohet.validation.true_covariance import true_covariance

    rows = []
    for n in ns:
        for snr in snrs:
            conf, sim, truth = simulate(out / f"hinge_n{n}_snr{snr:g}", n, snr, 20, seed=7)
            mean_true, vt, _ = true_covariance(conf.maps, truth["state"], conf.apix, res)
            row: dict = {"n": n, "snr": snr}
            run_dir = out / f"uniform_k1_n{n}_snr{snr:g}"
            r = run_child("moments", {"particles": str(without_poses(sim.particles_star)),
                                      "datadir": str(sim.particles_star.parent), "poses": "uniform",
                                      "uniform_components": 1, "resolution_A": res, **fit}, run_dir, threads)
            row.update({f"uniform_{k}": v for k, v in r.items()})
            if "error" not in r:
                mean = band_limit(read_map(run_dir / "mean.mrc")[0][None], 3.0, res)[0]
                al = align_map(mean, mean_true)
                comp = apply_alignment(read_map(run_dir / "component_01.mrc")[0], al)
                row["uniform_sine_top1"] = float(subspace_sines(comp.reshape(1, -1), vt[:1])[0])
                row["uniform_mean_cc"] = al.correlation
            run_dir = out / f"known_k1_n{n}_snr{snr:g}"
            r = run_child("moments", {"particles": str(sim.particles_star), "n_components": 1,
                                      "resolution_A": res, "movie_frames": 2}, run_dir, threads)
            row.update({f"known_{k}": v for k, v in r.items()})
            if "error" not in r:
                comp = read_map(run_dir / "component_01.mrc")[0]
                row["known_sine_top1"] = float(subspace_sines(comp.reshape(1, -1), vt[:1])[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("homogeneous", "hinge"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[1000])
    ap.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    ap.add_argument("--res", type=float, default=20.0, help="resolution limit of moments and of the scores, Å")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--starts", type=int, default=4, help="moments --n_starts")
    ap.add_argument("--fit_iter", type=int, default=50, help="moments --fit_iter")
    ap.add_argument("--abinit_max_n", type=int, default=2000, help="abinit is not run on more particles than this")
    a = ap.parse_args()
    fit = {"n_starts": a.starts, "fit_iter": a.fit_iter}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "homogeneous":
        rows = homogeneous(a.out, a.n, a.snr, a.res, a.threads, a.abinit_max_n, fit)
    else:
        rows = hinge(a.out, a.n, a.snr, a.res, a.threads, fit)
    (a.out / f"{a.what}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
