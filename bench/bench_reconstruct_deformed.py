"""Benchmark ``cryohet reconstruct-deformed`` against ``cryohet reconstruct`` on the simulator's hinge motion.

Data: the bundled adenylate kinase's LID closing by τ·``--angle`` degrees (τ on ``--states`` points in [0, 1]),
``--n`` particles at ``--snr`` (``cryohet.simulate``). The deformation model is the ground truth
(``models.hinge_truth``: the true displacement field, latents = the true τ), so the benchmark measures the
reconstruct-deformed itself, not a trained model. Both commands run on the same particles (the simulator's
half-sets), each in its own process with the same thread count (``bench/command_cost.py``). Reported: FSC AUC and
FSC = 0.5 resolution of each map against the true canonical map (τ = 0), half-map resolution at FSC 0.143, wall
and CPU time, peak memory.

    .venv/bin/python bench/bench_reconstruct_deformed.py --out /tmp/bench_rd          # docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cryohet.io.mrc import read_map
from cryohet.io.particles import load_particles
from cryohet.models.hinge_truth import HingeTruthModel, write_run
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at
from cryohet.record import read_record
from cryohet.simulate.atomic_truth import hinge_truth
from cryohet.simulate.deformation_truth import hinge_field
from cryohet.simulate.simulate import simulate_particles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from command_cost import Cost, timed  # noqa: E402  (beside this script)

REPO = Path(__file__).resolve().parents[1]


def run(method: str, args: list[str], out: Path, threads: int) -> Cost:
    """``cryohet <method> <args> --o out`` in its own process (this interpreter, this checkout)."""
    code = "import sys; from cryohet.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, method, *args, "--o", str(out), "--threads", str(threads), "--overwrite", "yes"]
    return timed(cmd, REPO, out.with_suffix(".log"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=5000, help="particles")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=2.0, help="Å/pixel")
    p.add_argument("--resolution_A", type=float, default=4.0, help="resolution of the simulated maps (Å)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--angle", type=float, default=50.0, help="hinge angle at τ = 1 (degrees)")
    p.add_argument("--states", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    truth = hinge_truth(a.states, a.angle, a.box, a.apix, a.resolution_A)
    sim = simulate_particles(truth.conf, a.out / "sim", a.n, snr=a.snr, seed=0, write_maps=False)
    pset = load_particles(sim.particles_star)
    tau = pset.table["cryohetTrueTau1"].to_numpy()[:, None]
    write_run(a.out / "truth_run", HingeTruthModel(hinge_field(truth), truth.heavy.weight, a.box, a.apix,
                                                   a.resolution_A), pset, tau)
    costs = {"reconstruct": run("reconstruct", ["--particles", str(sim.particles_star)], a.out / "rec", a.threads),
             "reconstruct-deformed": run("reconstruct-deformed", ["--run", str(a.out / "truth_run")], a.out / "rd",
                                         a.threads)}
    canonical = truth.conf.maps[0]
    rows = [("reconstruct", a.out / "rec" / "map.mrc", "reconstruct"),
            ("reconstruct-deformed: homogeneous.mrc", a.out / "rd" / "homogeneous.mrc", "reconstruct-deformed"),
            ("reconstruct-deformed: map.mrc (corrected)", a.out / "rd" / "map.mrc", "reconstruct-deformed")]
    half_res = {"reconstruct": read_record(a.out / "rec").of_kind("fsc")[0].meta["resolution_A"],
                "reconstruct-deformed: homogeneous.mrc": next(
                    o.meta["resolution_A"] for o in read_record(a.out / "rd").of_kind("fsc") if "homog" in o.label),
                "reconstruct-deformed: map.mrc (corrected)": next(
                    o.meta["resolution_A"] for o in read_record(a.out / "rd").of_kind("fsc") if "corr" in o.label)}
    print(f"{a.n} particles, box {a.box}, {a.apix} Å/px, maps at {a.resolution_A} Å, SNR {a.snr}, hinge 0-{a.angle}°"
          f" ({a.states} states), {a.threads} threads")
    print("| map | FSC AUC to truth (τ = 0) | FSC 0.5 to truth (Å) | half-map res. 0.143 (Å) | wall (s) | CPU (s) | "
          "peak memory (GB) |")
    print("|---|---|---|---|---|---|---|")
    for label, path, method in rows:
        vol, _ = read_map(path)
        curve = fsc(np.asarray(vol), canonical)
        c = costs[method]
        print(f"| {label} | {fsc_auc(curve):.3f} | {resolution_at(curve, a.box, a.apix, 0.5):.2f} | "
              f"{half_res[label]:.2f} | {c.wall_s:.1f} | {c.cpu_s:.1f} | {c.peak_gb:.2f} |")
    print(f"wall-time ratio reconstruct-deformed / reconstruct: "
          f"{costs['reconstruct-deformed'].wall_s / costs['reconstruct'].wall_s:.2f}")


if __name__ == "__main__":
    main()
