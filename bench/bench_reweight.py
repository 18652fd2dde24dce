"""MD-ensemble reweighting (``cryohet reweight``): recovery of known frame populations, against the hard-assignment
baseline in the same run, and the cost per 10⁴ images × 100 frames.

    .venv/bin/python bench/bench_reweight.py --out /tmp/bench_reweight

Accuracy: frames along adenylate kinase's open -> closed transition (``cryohet.simulate.ensemble``: heavy atoms
interpolated, written as DCD and read back through MDAnalysis), with uneven populations of two wells (p ∝
exp(−G), G a double well over the frames: populations 2 % to 38 %), particles simulated from that mixture (box
48, 3 Å/px, CTF, known poses) at several SNRs. For each SNR one likelihood pass over the largest set; the first N
particles of it give the smaller sets. Scores against the realised mixture of those N particles: total-variation
distance of the reweighting's populations (the posterior means, what ``cryohet reweight`` reports), of its
maximum-likelihood (EM) weights, and of the baseline that counts each image for its single best frame (hard
assignment, which ignores that images fit several frames); the fraction of frames whose 95 % credible interval
holds the truth; the mean probability of each particle's top frame.

Cost: ``--n_time`` images (default 10⁴) × ``--frames_time`` frames (default 100), box 64 at 2 Å/px scored to 6 Å:
seconds of the likelihood pass (rendering, noise estimate, the N × F matrix), of EM and of the Gibbs sampler.
Prints Markdown tables for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.inference.frame_likelihood import FrameScorer, frame_maps, loglik_matrix, working_lattice  # noqa: E402
from cryohet.inference.populations import (  # noqa: E402
    em_weights,
    gibbs_weights,
    hard_assignment,
    total_variation,
)
from cryohet.io.particles import load_particles  # noqa: E402
from cryohet.io.trajectory import read_trajectory  # noqa: E402
from cryohet.simulate.ensemble import simulate_ensemble  # noqa: E402


def double_well(n_frames: int) -> np.ndarray:
    """Populations ∝ exp(−G) along the frames, G (kT) a double well: minima at 1/5 (0 kT) and 3/4 (0.9 kT) of
    the path, a 3 kT barrier between them."""
    x = np.linspace(0, 1, n_frames)
    G = 3 * (1 - np.exp(-(x - 0.2) ** 2 / 0.02) - 0.7 * np.exp(-(x - 0.75) ** 2 / 0.02))
    p = np.exp(-G)
    return p / p.sum()


def likelihoods(data, out: Path, resolution_A: float, device: str) -> tuple[np.ndarray, float]:
    """The N × F log-likelihood matrix of a simulated ensemble and the seconds it took (rendering included)."""
    start = time.perf_counter()
    pset = load_particles(data.particles.particles_star)
    traj = read_trajectory(data.dcd, data.topology)
    lattice, radius = working_lattice(pset.box, pset.apix, resolution_A)
    maps = frame_maps(traj.xyz_A, traj.weight, pset.box, pset.apix, resolution_A, lattice.box, device)
    scorer = FrameScorer(maps, lattice.half_plane(radius))
    ll, _ = loglik_matrix(pset, scorer, lattice, out, device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return np.asarray(ll), time.perf_counter() - start


def accuracy(args: argparse.Namespace) -> list[dict]:
    weights = double_well(args.frames)
    rows = []
    for snr in args.snr:
        data = simulate_ensemble(args.out / f"snr{snr:g}", weights, max(args.n), snr, 48, 3.0, 8.0, seed=args.seed)
        ll, _ = likelihoods(data, args.out / f"snr{snr:g}" / "loglik.npy", 8.0, args.device)
        state = np.load(data.particles.ground_truth)["state"]
        for n in args.n:
            truth = np.bincount(state[:n], minlength=args.frames) / n
            w, _, _ = em_weights(ll[:n], device=args.device)
            s = gibbs_weights(ll[:n], w, 1000, 200, seed=args.seed, device=args.device)
            lo, hi = np.percentile(s, [2.5, 97.5], axis=0)
            p = np.exp(ll[:n] - ll[:n].max(1, keepdims=True)) * s.mean(0)
            rows.append({"snr": snr, "n": n, "tv_reweight": total_variation(s.mean(0), truth),
                         "tv_ml": total_variation(w, truth),
                         "tv_hard": total_variation(hard_assignment(ll[:n]), truth),
                         "coverage": float(((lo <= truth) & (truth <= hi)).mean()),
                         "top_probability": float((p.max(1) / p.sum(1)).mean())})
            print(rows[-1], flush=True)
    return rows


def cost(args: argparse.Namespace) -> dict:
    x = np.linspace(0, 1, args.frames_time)
    data = simulate_ensemble(args.out / "cost", np.exp(-4 * (x - 0.3) ** 2), args.n_time, 0.05, 64, 2.0, 6.0,
                             seed=args.seed)
    ll, t_ll = likelihoods(data, args.out / "cost" / "loglik.npy", 6.0, args.device)
    t0 = time.perf_counter()
    w, iters, _ = em_weights(ll, device=args.device)
    t_em = time.perf_counter() - t0
    t0 = time.perf_counter()
    gibbs_weights(ll, w, 1000, 200, device=args.device)
    t_gibbs = time.perf_counter() - t0
    scale = 1e4 / args.n_time * 100 / args.frames_time
    return {"n": args.n_time, "frames": args.frames_time, "likelihood_s": t_ll, "em_s": t_em, "em_iterations": iters,
            "gibbs_1200_sweeps_s": t_gibbs, "likelihood_s_per_1e4x100": t_ll * scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--snr", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--n_time", type=int, default=10000)
    ap.add_argument("--frames_time", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_cost", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = accuracy(args)
    print(f"\n{args.frames} frames, double-well populations; TV distance to the realised mixture\n")
    print("| SNR | particles | TV reweighting (posterior mean) | TV maximum likelihood (EM) | TV hard assignment "
          "| hard / reweighting | 95 % CI coverage | mean top-frame probability |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['snr']:g} | {r['n']} | {r['tv_reweight']:.3f} | {r['tv_ml']:.3f} | "
              f"{r['tv_hard']:.3f} | {r['tv_hard'] / max(r['tv_reweight'], 1e-9):.1f} | {r['coverage']:.2f} | "
              f"{r['top_probability']:.2f} |")
    if not args.skip_cost:
        c = cost(args)
        print(f"\nCost on {args.device} ({args.threads} threads): {c['n']} images × {c['frames']} frames, box 64 "
              "scored to 6 Å\n")
        print("| likelihood pass (s) | per 10⁴ images × 100 frames (s) | EM (s, iterations) | Gibbs, 1200 sweeps (s) |")
        print("|---:|---:|---:|---:|")
        print(f"| {c['likelihood_s']:.1f} | {c['likelihood_s_per_1e4x100']:.1f} | {c['em_s']:.1f} "
              f"({c['em_iterations']}) | {c['gibbs_1200_sweeps_s']:.1f} |")


if __name__ == "__main__":
    main()
