"""How much of the attainable gain the kernel-volumes shell choice gets: at a few true states of a benchmark
dataset, with the true τ as latents, the FSC AUC against the state's true map of each neighbourhood's map alone,
of cryohet's choice (one-standard-error rule among the neighbourhoods with signal), of a plain smoothed argmin of
the cross-validation error, and of the oracle (each shell from the neighbourhood whose shell agrees best with the
true map, the most any choice among these maps can reach).

    .venv/bin/python bench/bench_kernel_choice.py --data /tmp/bench_kernel/data --states 4 9 14

``--data``: a folder made by ``cryohet benchmark-make`` (e.g. the one of bench/bench_kernel_volumes.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cryohet.io.particles import load_particles
from cryohet.reconstruct import kernel as K
from cryohet.reconstruct.fsc import fsc, fsc_auc
from cryohet.reconstruct.homogeneous import particle_halves
from cryohet.validation.datasets import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--states", type=int, nargs="+", default=[4, 9, 14])
    ap.add_argument("--min_particles", type=int, default=60)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(a.data)
    pset = load_particles(ds.particles_star)
    kr = K.KernelRegression(pset, ds.tau.astype(np.float64), particle_halves(pset, 0), pset.box,
                            torch.device("cpu"), min_particles=a.min_particles)
    print("| state | " + " | ".join(f"{n} only" for n in kr.sizes) + " | cryohet | argmin | oracle |")
    print("|---" * (len(kr.sizes) + 4) + "|")
    for s in a.states:
        levels, E, curves, _ = kr.levels(ds.state_tau[s])
        maps = [full for _, full in levels]
        truth = ds.true_model().map(s)
        per_level = [fsc_auc(fsc(m, truth)) for m in maps]
        oracle = np.array([fsc(m, truth) for m in maps]).argmax(0)
        choices = {"cryohet": K.choose_levels(E, curves >= K.SIGNAL_FSC),
                   "argmin": np.argmin(K.smooth_shells(E).mean(1), axis=0), "oracle": oracle}
        auc = {k: fsc_auc(fsc(K.combine_shells(maps, c), truth)) for k, c in choices.items()}
        print(f"| {s} | " + " | ".join(f"{v:.3f}" for v in per_level) + " | "
              + " | ".join(f"{auc[k]:.3f}" for k in ("cryohet", "argmin", "oracle")) + " |")


if __name__ == "__main__":
    main()
