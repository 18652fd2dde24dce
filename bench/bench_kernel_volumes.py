"""Kernel volumes side by side: per-image FSC AUC of `cryohet kernel-volumes` on the latents of `principal-volumes`
and `train-vae` against those methods' own maps, the homogeneous map, and RECOVAR 1.0.5 when installed.

    .venv/bin/python bench/bench_kernel_volumes.py --out /tmp/bench_kernel            # box 64, 2000 images, SNR 0.1
    .venv/bin/python bench/bench_kernel_volumes.py --out /tmp/bench_kernel --recovar /work/peers/recovar-venv/bin/python

Data: ``cryohet benchmark-make --dataset hinge`` (the bundled adenylate kinase's hinge motion, 20 true maps) with a
known, non-uniform population along the motion: two wells (weights exp(-((τ - 0.2) / 0.12)²) + 0.6 exp(-((τ -
0.75) / 0.1)²) + 0.04 over the 20 states, τ in [0, 1]), box ``--box`` over a 128 Å field, ``--n`` images, SNR
``--snr``, CTF. Rows:

* ``reconstruct``: one homogeneous map for every particle (``--volumes`` with one label).
* ``principal-volumes`` and ``train-vae`` at their defaults: their own maps at each particle's latent.
* ``kernel-volumes`` on each of those latents, and on the true τ (the kernel method's ceiling with perfect
  latents): maps at ``--points`` k-means centres (defaults otherwise); a particle gets the map of its nearest
  centre.
* RECOVAR 1.0.5 (``--recovar``: the Python of an environment holding it, run through ``bench/recovar_cpu.py``, which
  mends its CPU projector; its pipeline at zdim 4, then its kernel maps (``compute_state``) at ``--points``
  k-means centres of its own latents): skipped when not given.

Landscape rows: ``cryohet landscape --dims 1`` (first principal component) on the latents of principal-volumes (with
its per-particle s.d., deconvolved; and without it, a plain smoothed density) and of train-vae (its log-variance),
``--path_maps no``. Score: the free energy of each true state, the mean over its particles of their
``cryohetFreeEnergy``, against −log of the state's true population, RMS in kT weighted by the population after the
best constant offset (a flat landscape scores the RMS of −log population itself, also printed).

Every map row is scored by ``cryohet benchmark-score`` (per-image FSC AUC against each sampled particle's true map,
4 particles for each of the 20 states; definitions in docs/benchmarks/validation.md) and timed as a whole command
(wall, CPU, peak memory; ``bench/command_cost.py``). A step whose folder already holds a finished run is reused
(delete the folder to redo it). Writes ``results.json`` in ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import recovar_cpu  # noqa: E402  (beside this script)
from command_cost import Cost, timed  # noqa: E402  (beside this script)

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
REPO = Path(__file__).resolve().parents[1]
CRYOHET = [sys.executable, "-m", "cryohet.cli"]


def populations(n_states: int) -> np.ndarray:
    t = np.linspace(0, 1, n_states)
    p = np.exp(-((t - 0.2) / 0.12) ** 2) + 0.6 * np.exp(-((t - 0.75) / 0.1) ** 2) + 0.04
    return p / p.sum()


def data_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments of the two-well hinge data shared by the bench scripts: --out, --box, --n, --snr, --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def make_data(a: argparse.Namespace) -> tuple[Path, Path]:
    """(the output folder, its data folder): ``benchmark-make --dataset hinge`` with the two-well population."""
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pops = ",".join(f"{p:.6f}" for p in populations(20))
    step(out, "data", ["benchmark-make", "--dataset", "hinge", "--box", str(a.box), "--n_particles", str(a.n),
                       "--snr", str(a.snr), "--n_states", "20", "--populations", pops], a.threads)
    return out, out / "data"


def finished(folder: Path) -> bool:
    rec = folder / "cryohet_run.json"
    return rec.is_file() and json.loads(rec.read_text()).get("status") == "finished"


def step(out: Path, name: str, args: list[str], threads: int) -> Cost | None:
    """Run ``cryohet <args> --o out/name`` unless it finished before; its cost (None when reused)."""
    folder = out / name
    if finished(folder):
        return None
    cmd = CRYOHET + args + ["--o", str(folder), "--threads", str(threads), "--overwrite", "yes"]
    return timed(cmd, REPO, out / f"{name}.log")


def score(out: Path, dataset: Path, name: str, args: list[str]) -> dict:
    folder = out / f"score_{name}"
    if not finished(folder):
        cmd = CRYOHET + ["benchmark-score", "--dataset", str(dataset), "--label", name, *args, "--o", str(folder),
                         "--overwrite", "yes"]
        timed(cmd, REPO, out / f"score_{name}.log")
    return json.loads((folder / "metrics.json").read_text())["summary"]


def main() -> None:
    ap = data_arguments(__doc__)
    ap.add_argument("--points", type=int, default=20, help="k-means centres for the kernel maps")
    ap.add_argument("--recovar", default=None,
                    help="the Python of RECOVAR 1.0.5's environment (it runs bench/recovar_cpu.py)")
    ap.add_argument("--skip_truth", action="store_true", help="no kernel-volumes row on the true τ")
    a = ap.parse_args()
    out, data = make_data(a)
    star = str(data / "particles.star")
    truth = np.load(data / "ground_truth.npz")
    np.save(out / "true_tau.npy", truth["tau"].astype(np.float32))
    costs: dict[str, Cost | None] = {
        "reconstruct": step(out, "reconstruct", ["reconstruct", "--particles", star], a.threads),
        "principal-volumes": step(out, "principal-volumes", ["principal-volumes", "--particles", star], a.threads),
        "train-vae": step(out, "train-vae", ["train-vae", "--particles", star], a.threads),
    }
    kernel = ["--n_points", str(a.points)]
    costs["kernel-volumes (principal-volumes latents)"] = step(
        out, "kernel_pv", ["kernel-volumes", "--run", str(out / "principal-volumes"), *kernel], a.threads)
    costs["kernel-volumes (train-vae latents)"] = step(
        out, "kernel_vae", ["kernel-volumes", "--run", str(out / "train-vae"), *kernel], a.threads)
    if not a.skip_truth:
        costs["kernel-volumes (true τ)"] = step(
            out, "kernel_truth", ["kernel-volumes", "--particles", star, "--latents", str(out / "true_tau.npy"),
                                  *kernel], a.threads)
    np.save(out / "zeros.npy", np.zeros(a.n, dtype=np.int64))
    maps = out / "reconstruct_maps"
    maps.mkdir(exist_ok=True)
    if not (maps / "map.mrc").exists():
        (maps / "map.mrc").symlink_to(out / "reconstruct" / "map.mrc")
    rows = {
        "reconstruct": score(out, data, "reconstruct", ["--latents", str(out / "true_tau.npy"), "--volumes",
                                                        str(maps), "--volume_labels", str(out / "zeros.npy")]),
        "principal-volumes": score(out, data, "principal-volumes", ["--run", str(out / "principal-volumes")]),
        "train-vae": score(out, data, "train-vae", ["--run", str(out / "train-vae")]),
        "kernel-volumes (principal-volumes latents)": score(out, data, "kernel_pv", ["--run", str(out / "kernel_pv")]),
        "kernel-volumes (train-vae latents)": score(out, data, "kernel_vae", ["--run", str(out / "kernel_vae")]),
    }
    if not a.skip_truth:
        rows["kernel-volumes (true τ)"] = score(out, data, "kernel_truth", ["--run", str(out / "kernel_truth")])
    if a.recovar is not None:
        rows["RECOVAR 1.0.5"], costs["RECOVAR 1.0.5"] = recovar_row(out, data, a)
    landscapes = {
        "landscape (principal-volumes, deconvolved)": ["--run", str(out / "principal-volumes")],
        "landscape (principal-volumes, no s.d.)": ["--particles", star, "--latents",
                                                   str(out / "principal-volumes" / "latents.npy")],
        "landscape (train-vae, deconvolved)": ["--run", str(out / "train-vae")],
    }
    energy = {}
    for i, (k, args) in enumerate(landscapes.items()):
        costs[k] = step(out, f"landscape_{i}", ["landscape", *args, "--dims", "1", "--path_maps", "no"], a.threads)
        energy[k] = energy_rms(np.load(out / f"landscape_{i}" / "free_energy.npy")[:, 0], truth["state"])
    flat = energy_rms(np.zeros(a.n), truth["state"])
    result = {"settings": vars(a) | {"out": str(out), "recovar": str(a.recovar)},
              "rows": {k: {"score": v, "cost": asdict(costs[k]) if costs.get(k) else None} for k, v in rows.items()},
              "landscape": {k: {"rms_kT": v, "cost": asdict(costs[k]) if costs.get(k) else None}
                            for k, v in energy.items()} | {"flat landscape": {"rms_kT": flat, "cost": None}}}
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for part in ("rows", "landscape"):  # keep the costs measured when a step really ran
        for k, v in result[part].items():
            if v["cost"] is None and previous.get(part, {}).get(k, {}).get("cost"):
                v["cost"] = previous[part][k]["cost"]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("| result | per-image FSC AUC | FSC 0.5 (Å) | latent |Spearman| | wall (s) | peak (GB) |")
    print("|---|---|---|---|---|---|")
    for k, v in result["rows"].items():
        s, c = v["score"], v["cost"]
        print(f"| {k} | {s['fsc_auc']:.3f} | {s['res_0.5_A']:.1f} | {s['latent_score']:.2f} | "
              f"{c['wall_s']:.0f} | {c['peak_gb']:.2f} |" if c else
              f"| {k} | {s['fsc_auc']:.3f} | {s['res_0.5_A']:.1f} | {s['latent_score']:.2f} | – | – |")
    print("\n| landscape | free-energy RMS vs truth (kT) | wall (s) |\n|---|---|---|")
    for k, v in result["landscape"].items():
        print(f"| {k} | {v['rms_kT']:.2f} | {v['cost']['wall_s']:.0f} |" if v["cost"] else
              f"| {k} | {v['rms_kT']:.2f} | – |")


def energy_rms(per_particle: np.ndarray, state: np.ndarray) -> float:
    """Population-weighted RMS (kT) between each true state's mean free energy and −log its population, after the
    best constant offset."""
    pop = np.bincount(state) / len(state)
    present = np.flatnonzero(pop > 0)
    d = np.array([per_particle[state == s].mean() for s in present]) + np.log(pop[present])
    w = pop[present]
    d -= np.average(d, weights=w)
    return float(np.sqrt(np.average(d**2, weights=w)))


def recovar_row(out: Path, data: Path, a) -> tuple[dict, Cost]:
    """RECOVAR's pipeline at zdim 4 (mended on a CPU: bench/recovar_cpu.py), then its kernel maps
    (``compute_state``) at ``--points`` k-means centres of its latents; a particle gets its nearest centre's map."""
    from sklearn.cluster import KMeans

    folder = out / "recovar"
    folder.mkdir(parents=True, exist_ok=True)
    exe = recovar_cpu.command(a.recovar)
    pipeline = timed([*exe, "pipeline", str(data / "particles.star"), "--mask", "sphere", "--zdim", "4",
                      "--accept-cpu", "-o", str(folder / "pipeline")], REPO, out / "recovar.log")
    z = recovar_cpu.latents(folder / "pipeline", 4)
    np.save(folder / "latents.npy", z)
    centres = KMeans(a.points, n_init=10, random_state=0).fit(z).cluster_centers_
    np.savetxt(folder / "centres.txt", centres)
    states = timed([*exe, "compute_state", str(folder / "pipeline"), "--latent-points", str(folder / "centres.txt"),
                    "-o", str(folder / "states")], REPO, out / "recovar_states.log")
    volumes = folder / "volumes"  # the maps alone, in the centres' order (compute_state adds diagnostics)
    volumes.mkdir(exist_ok=True)
    for k, m in enumerate(recovar_cpu.state_maps(folder / "states", a.points)):
        link = volumes / f"state{k:03d}.mrc"
        if not link.exists():
            link.symlink_to(m)
    summary = score(out, data, "recovar", ["--latents", str(folder / "latents.npy"), "--volumes", str(volumes),
                                           "--volume_latents", str(folder / "centres.txt")])
    return summary, pipeline + states


if __name__ == "__main__":
    main()
