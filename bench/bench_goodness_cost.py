"""CPU cost of train-vae's per-particle goodness-of-fit pass (``validation.goodness.score_particles``), an earlier
revision beside this tree in one run, and how far the scores moved.

One simulated set (box 32) and one 1-epoch train-vae model (this tree); then, in a child process per tree and
setting, ``score_particles`` on that model's ``latent_predictors`` (the revision's own code: float32 before the
mixed-precision change, the trainer's ``--amp auto`` after), median CPU seconds of ``--repeat`` calls, with a noise
sample of 2000 (at least every particle: each is scored once either way) and of 300 (fewer than the particles).
Prints both, their ratio, and the RMS / largest change of cryohetFitZ.

    .venv/bin/python bench/bench_goodness_cost.py --before 25817b3 --out /tmp/bench_goodness_cost
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_trainer_scale import cryohet, export, train  # noqa: E402

_CHILD = r"""
import inspect, json, statistics, sys, time
import numpy as np, torch
from cryohet.io.particles import load_particles
from cryohet.models.neural import load_run_model
from cryohet.validation.goodness import latent_predictors, score_particles
torch.set_num_threads(1)
run, n_sample, repeat, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pset = load_particles(run + "/particles.star")
model = load_run_model(run, run + "/model.safetensors").eval()
kw = dict(box=model.box, batch_size=64, n_sample=n_sample)
if "amp" in inspect.signature(score_particles).parameters:
    kw["amp"] = "auto"
secs = []
for _ in range(repeat):
    t = time.process_time()
    s = score_particles(pset, *latent_predictors(model, np.load(run + "/z.npy")), **kw)
    secs.append(time.process_time() - t)
np.save(out, s.fit_z)
print(json.dumps({"cpu_s": statistics.median(secs)}))
"""


def score_cost(tree: Path, run: Path, n_sample: int, repeat: int, out: Path) -> float:
    """Median CPU seconds of ``score_particles`` with ``tree``'s cryohet; its cryohetFitZ saved to ``out``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CRYOHET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # run outside any tree: ``python -c`` puts its working folder first on the path
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(run), str(n_sample), str(repeat), str(out)],
                          capture_output=True, text=True, env=env, check=True, cwd=out.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])["cpu_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_goodness_cost"))
    ap.add_argument("--n", type=int, default=1000, help="particles")
    ap.add_argument("--dim", type=int, default=256, help="encoder and decoder width")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    trees = {"before": export(a.before, a.out / "before"), "now": ROOT}
    sim = a.out / "sim"
    if not (sim / "particles.star").exists():
        cryohet(ROOT, ["simulate", "--o", str(sim), "--box", "32", "--apix", "4", "--resolution_A", "10",
                       "--n_particles", str(a.n), "--snr", "1", "--n_states", "20", "--threads", "1", "--seed", "3"],
                a.out, a.out / "simulate.log")
    run = a.out / "model"
    if not (run / "model.safetensors").exists():
        train(ROOT, sim / "particles.star", run, 64, 1, a.dim)
    print(f"{a.n} particles, box 32, {a.dim}-wide decoder (1 epoch), batch 64; before = {a.before}, now = this tree")
    print("| noise sample | before CPU s | now CPU s | now / before | cryohetFitZ change RMS / max |")
    print("|---|---|---|---|---|")
    for n_sample in (2000, 300):
        cost = {name: score_cost(tree, run, n_sample, a.repeat, a.out / f"fit_z_{name}_{n_sample}.npy")
                for name, tree in trees.items()}
        d = np.load(a.out / f"fit_z_now_{n_sample}.npy") - np.load(a.out / f"fit_z_before_{n_sample}.npy")
        print(f"| {n_sample} | {cost['before']:.2f} | {cost['now']:.2f} | {cost['now'] / cost['before']:.2f} | "
              f"{np.sqrt(np.mean(d ** 2)):.3f} / {np.abs(d).max():.3f} |")


if __name__ == "__main__":
    main()
