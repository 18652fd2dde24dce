"""3-D classification with fixed poses side by side with RELION 3.1.3's ``relion_refine --skip_align --K``.

    .venv/bin/python bench/bench_classify.py --out /tmp/bench_classify

Two simulated data sets of the bundled adenylate kinase (box 64, 2 Å/px, CTF, known poses), with uneven
populations 60/30/10 %:

* ``discrete``: ``cryohet benchmark-make --dataset discrete --n_states 3 --populations 0.6,0.3,0.1``: open,
  LID closed (50°), LID and NMP closed (50° and 45°).
* ``mixed``: the same three states, each also moving continuously: the LID spreads uniformly over 20° about the
  state's angle (open 0-20°, closed 30-50°; 5 maps per state), so the states differ by a 10° gap on the LID
  hinge (open vs LID closed) and by the NMP domain alone (LID closed vs both closed).

Both programs classify the same STAR into K classes for the same number of iterations. RELION starts from the
homogeneous reconstruction of the particles (``relion_reconstruct --ctf``, its time counted in RELION's) low-passed
by ``--ini_high``, with tau2_fudge 4, ``--j 2`` in one process (faster here than ``mpirun -n 3
relion_refine_mpi --j 1``; ``--relion_mpi`` runs that). cryohet runs ``cryohet classify`` with its defaults.
Scores: adjusted Rand index of the classes to the true states, the population of the class matched to each state
(Hungarian matching on the contingency table), classes left empty (< 1 % of the particles), whole-command wall
time and the ratio cryohet / RELION, and the peak resident memory of each command (``os.wait4``). Prints a
Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from command_cost import Cost, timed  # noqa: E402  (beside this script)

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.io.star import read_star  # noqa: E402

POPULATIONS = (0.6, 0.3, 0.1)
#: Mixed data set: per state (LID angle at the middle of its spread, NMP angle), degrees.
MIXED_STATES = ((10.0, 0.0), (40.0, 0.0), (40.0, 45.0))
LID_SPREAD_DEG = 20.0
MAPS_PER_STATE = 5
EMPTY_FRACTION = 0.01
DIAMETER_A = 100.0  # RELION --particle_diameter: the molecule is about 70 Å long, the field of view 128 Å




def make_discrete(d: Path, n: int, box: int, snr: float, seed: int) -> None:
    from cryohet.validation.datasets import make_dataset

    make_dataset("discrete", d, box=box, n_particles=n, snr=snr, n_states=len(POPULATIONS),
                 populations=np.array(POPULATIONS), seed=seed)


def make_mixed(d: Path, n: int, box: int, snr: float, seed: int) -> None:
    """Three discrete states, each spread continuously along the LID hinge (cryohet.simulate, python API)."""
    from cryohet.simulate.density import atoms_to_map
    from cryohet.simulate.molecules import atom_coords, atom_weights, centre_of_mass, default_molecule
    from cryohet.simulate.motions import Conformations, default_hinges
    from cryohet.simulate.simulate import simulate_particles

    mol = default_molecule()
    xyz, w = atom_coords(mol), atom_weights(mol)
    hinges = default_hinges()
    lid, nmp = hinges["LID"][0], hinges["NMP"][0]
    offsets = np.linspace(-LID_SPREAD_DEG / 2, LID_SPREAD_DEG / 2, MAPS_PER_STATE)
    tau, models = [], []
    for k, (lid_deg, nmp_deg) in enumerate(MIXED_STATES):
        for off in offsets:
            models.append(nmp.apply(lid.apply(xyz, lid_deg + off), nmp_deg))
            tau.append((k, lid_deg + off, nmp_deg))
    centre = np.mean([centre_of_mass(x, w) for x in models], axis=0)
    apix = 128.0 / box
    res = max(6.0, 2.5 * apix)
    maps = np.stack([atoms_to_map(x, box, apix, res, centre_A=centre, weights=w) for x in models])
    conf = Conformations(maps, np.array(tau), apix, "continuous", meta=dict(motion="mixed"))
    pops = np.repeat(np.array(POPULATIONS) / MAPS_PER_STATE, MAPS_PER_STATE)
    simulate_particles(conf, d, n_particles=n, snr=snr, populations=pops, seed=seed)
    (d / "mixed.json").write_text(json.dumps({"tau_columns": ["state", "lid_deg", "nmp_deg"], "snr": snr,
                                              "states": MIXED_STATES, "lid_spread_deg": LID_SPREAD_DEG,
                                              "populations": POPULATIONS}, indent=1))


def true_states(d: Path) -> np.ndarray:
    """Discrete state of every particle, in STAR row order."""
    with np.load(d / "ground_truth.npz") as gt:
        if (d / "mixed.json").exists():
            return np.asarray(gt["tau"][:, 0], dtype=np.int64)
        return np.asarray(gt["state"], dtype=np.int64)


def run_relion(d: Path, k: int, iterations: int, threads: int, mpi: bool, diameter_A: float,
               ini_high_A: float, seed: int) -> Cost:
    run = d / "relion"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    ref = timed(["relion_reconstruct", "--i", "particles.star", "--o", "relion/consensus.mrc", "--ctf"], d,
                         run / "reconstruct.log")
    opts = ["--i", "particles.star", "--o", "relion/run", "--ref", "relion/consensus.mrc", "--ini_high",
            str(ini_high_A), "--skip_align", "--K", str(k), "--tau2_fudge", "4", "--iter", str(iterations), "--ctf",
            "--particle_diameter", f"{diameter_A:.0f}", "--flatten_solvent", "--zero_mask", "--pad", "2",
            "--sym", "C1", "--dont_combine_weights_via_disc", "--pool", "30", "--random_seed", str(seed)]
    if mpi:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(threads + 1), "relion_refine_mpi",
               *opts, "--j", "1"]
    else:
        cmd = ["relion_refine", *opts, "--j", str(threads)]
    return ref + timed(cmd, d, run / "refine.log")


def relion_classes(d: Path, iterations: int) -> np.ndarray:
    """RELION's class (0-based) of every particle, in the input STAR's row order."""
    ours = read_star(d / "particles.star")["particles"]
    rel = read_star(d / "relion" / f"run_it{iterations:03d}_data.star")["particles"]
    cls = dict(zip(rel["rlnImageName"], rel["rlnClassNumber"].astype(int)))
    return np.array([cls[name] for name in ours["rlnImageName"]]) - 1


def run_cryohet(d: Path, k: int, iterations: int, threads: int, init: str, seed: int) -> Cost:
    cmd = [sys.executable, "-m", "cryohet.cli", "classify", "--particles", "particles.star", "--o", f"cryohet_{init}",
           "--K", str(k), "--iterations", str(iterations), "--init", init, "--threads", str(threads),
           "--seed", str(seed), "--particle_diameter_A", f"{DIAMETER_A:g}", "--overwrite", "yes"]
    return timed(cmd, d, d / f"cryohet_{init}.log")


def cryohet_classes(d: Path, init: str) -> np.ndarray:
    out = d / f"cryohet_{init}"
    star = read_star(out / "particles.star")["particles"]
    probs = np.load(out / "class_probabilities.npy")
    cls = star["rlnClassNumber"].to_numpy().astype(int) - 1
    if not np.array_equal(cls, probs.argmax(1)):
        print(f"note: {out}: rlnClassNumber differs from the argmax of class_probabilities.npy "
              f"for {(cls != probs.argmax(1)).sum()} particles", flush=True)
    return cls


def score(truth: np.ndarray, found: np.ndarray, k: int) -> dict:
    """ARI, matched populations (one per true state) and the number of empty classes."""
    n_true = int(truth.max()) + 1
    table = pd.crosstab(truth, found).reindex(index=range(n_true), columns=range(k), fill_value=0).to_numpy()
    rows, cols = linear_sum_assignment(-table)
    counts = np.bincount(found, minlength=k)
    matched = np.full(n_true, np.nan)
    matched[rows] = counts[cols] / len(found)
    return {"ari": adjusted_rand_score(truth, found), "matched": matched,
            "true": np.bincount(truth, minlength=n_true) / len(truth),
            "empty": int((counts < EMPTY_FRACTION * len(found)).sum()), "counts": counts.tolist()}


def fmt(p: np.ndarray) -> str:
    return "/".join(f"{100 * x:.0f}" if np.isfinite(x) else "–" for x in p)


def row(name: str, tool: str, s: dict, cost: Cost, relion: Cost) -> str:
    return (f"| {name} | {tool} | {s['ari']:.3f} | {fmt(s['matched'])} ({fmt(s['true'])}) | {s['empty']} "
            f"| {cost.wall_s:.0f} | {cost.wall_s / relion.wall_s:.2f} | {cost.cpu_s:.0f} "
            f"| {cost.cpu_s / relion.cpu_s:.2f} | {cost.peak_gb:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_classify"))
    ap.add_argument("--datasets", nargs="+", default=["discrete", "mixed"], choices=["discrete", "mixed"])
    ap.add_argument("--n", type=int, default=2000, help="particles per data set")
    ap.add_argument("--box", type=int, default=64, help="box in pixels (field of view 128 Å)")
    ap.add_argument("--snr", type=float, default=0.05, help="signal variance over noise variance in the particle")
    ap.add_argument("--K", type=int, default=3, help="classes")
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2, help="threads of each program (the machine's 2 cores)")
    ap.add_argument("--relion_mpi", action="store_true", help="mpirun -n threads+1 relion_refine_mpi --j 1")
    ap.add_argument("--ini_high_A", type=float, default=30.0, help="RELION --ini_high (low-pass of the reference)")
    ap.add_argument("--inits", nargs="+", default=["pca"], choices=["pca", "random"],
                    help="cryohet classify --init values to run (one row each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_relion", action="store_true", help="score an earlier RELION run in the same folder")
    args = ap.parse_args()
    lines = []
    for name in args.datasets:
        d = args.out / f"{name}_n{args.n}_snr{args.snr:g}"
        if not (d / "ground_truth.npz").exists():
            (make_discrete if name == "discrete" else make_mixed)(d, args.n, args.box, args.snr, args.seed)
        truth = true_states(d)
        timing_file = d / "relion" / "timing.json"
        if args.skip_relion and timing_file.exists():
            rel = Cost(**json.loads(timing_file.read_text()))
        else:
            rel = run_relion(d, args.K, args.iterations, args.threads, args.relion_mpi, DIAMETER_A,
                             args.ini_high_A, args.seed)
            timing_file.write_text(json.dumps(asdict(rel)))
        tool = "RELION 3.1.3 `relion_refine --skip_align`" + (" (MPI)" if args.relion_mpi else "")
        lines.append(row(name, tool, score(truth, relion_classes(d, args.iterations), args.K), rel, rel))
        print(lines[-1], flush=True)
        for init in args.inits:
            ours = run_cryohet(d, args.K, args.iterations, args.threads, init, args.seed)
            s = score(truth, cryohet_classes(d, init), args.K)
            lines.append(row(name, f"cryohet `classify --init {init}`", s, ours, rel))
            print(lines[-1], flush=True)
    print(f"\n{args.n} particles, box {args.box}, SNR {args.snr:g}, K {args.K}, {args.iterations} iterations\n")
    print("| data | program | ARI to true states | populations % matched to states (true) | empty classes "
          "| wall (s) | wall / RELION | CPU (s) | CPU / RELION | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
