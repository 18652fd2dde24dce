"""Heterogeneous ab initio side by side: `cryohet abinit-het`, `cryohet abinit` + `train-vae` on its poses, and
cryoDRGN 4.3.1's `cryodrgn abinit --zdim` (DRGN-AI), on a simulated hinge whose poses are hidden.

    .venv/bin/python bench/bench_abinit_het.py --out /tmp/bench_abinit_het --n 600 --box 32 --snr 1 \\
        --cryodrgn /path/to/cryodrgn --cryodrgn_epochs 2

Data (made once per folder and reused): ``cryohet.simulate`` of the bundled adenylate kinase's LID hinge (20 states
over 50°, τ = 0 … 1 uniform), ``--n`` particles of ``--box`` px over a 128 Å field of view, CTF, origins σ 2 Å,
uniform orientations, SNR ``--snr``. Every program reads ``particles_noposes.star`` (bench_abinit.py's: no angle,
origin or truth columns).

Rows:

* ``cryohet abinit-het``: its defaults but ``--local_iterations 2`` (the consensus), ``--zdim 1``, networks of 128
  (encoder and decoder), ``--lr 1e-3``, ``--rounds`` re-searches between ``--epochs`` of training each.
* ``cryohet abinit`` + ``train-vae``: the same consensus, then the same network trained on its poses, unchanged, for
  as many epochs as abinit-het trains in all ((rounds + 1) × epochs): what the re-search adds.
* cryoDRGN 4.3.1 ``cryodrgn abinit --zdim 1`` from ``--cryodrgn`` (its own environment), CTF from
  ``parse_ctf_star --ps 0``, its defaults but ``-n`` (``--cryodrgn_epochs``: its pretraining pass, then hierarchical
  pose-search epochs; on two cores one epoch of a few hundred 32 px images takes tens of minutes), ``--max-threads``,
  ``--num-workers 0`` (no loader processes), ``--seed`` and ``--no-analysis``. Poses: the last ``pose.<epoch>.pkl``
  (A = R, origin = +t px, as bench_abinit.py checks), latents ``z.<epoch>.pkl``.

Scores: pose errors after the best global rotation, translation and hand (``validation.poses.pose_errors``); the
latent's |Spearman| of its PC1 with the true τ; for ours, the per-image FSC AUC: maps at the latents of 2 particles
per state, moved into the true frame (``map_in_true_frame`` with the fitted rotation, translation and hand), FSC
against that state's true map (``validation.metrics.volume_fsc``), mean of the normalised areas; the consensus
map's AUC against the same true maps for comparison. Wall and CPU seconds and peak memory of each command
(``bench/command_cost.py``). Writes ``results.json`` in ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
from bench_abinit import (  # noqa: E402  (beside this script)
    FOV_A,
    HIDDEN,
    NOPOSE_STAR,
    cryodrgn_conventions,
    last_pose_pkl,
    run_cryodrgn,
    star_poses,
    truth,
)
from command_cost import Cost, timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NET = dict(zdim=1, enc_dim=128, dec_dim=128, lr=1e-3)

_RUN = textwrap.dedent("""
    import json, sys
    from cryohet.runner import run_method
    from cryohet.methods.{module} import METHOD
    run_method(METHOD, {{"overwrite": True, **json.loads(sys.argv[1])}}, sys.argv[2])
""")


def make_data(d: Path, n: int, box: int, snr: float, seed: int) -> None:
    """The hinge particles (truth in particles.star / ground_truth.npz) and the pose-free STAR."""
    from cryohet.io.star import read_star, write_star
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import hinge_conformations
    from cryohet.simulate.simulate import simulate_particles

    apix = FOV_A / box
    conf = hinge_conformations(default_molecule(), 20, 50.0, box=box, apix=apix, resolution_A=max(6.0, 2.5 * apix))
    simulate_particles(conf, d, n, snr, seed=seed, image_paths="star")
    blocks = read_star(d / "particles.star")
    parts = blocks["particles"]
    keep = [c for c in parts.columns if c not in HIDDEN and not c.startswith("cryohet")]
    write_star(d / NOPOSE_STAR, {"optics": blocks["optics"], "particles": parts[keep]})
    (d / "bench.json").write_text(json.dumps({"n": n, "box": box, "apix": apix, "snr": snr, "seed": seed}))


def run(module: str, values: dict[str, Any], out: Path, rescore: bool = False) -> Cost:
    """Run a cryohet method into ``out`` (a fresh folder) and measure it; ``rescore``: keep the run already
    there (its cost then unknown, NaN)."""
    if rescore and (out / "cryohet_run.json").exists():
        return Cost(float("nan"), float("nan"), float("nan"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return timed([sys.executable, "-c", _RUN.format(module=module), json.dumps(values), str(out)], REPO,
                 out.with_suffix(".log"))


def per_image_auc(d: Path, run_dir: Path, z: np.ndarray, errors: Any, apix: float) -> tuple[float, float]:
    """Mean FSC AUC of the model's maps at the latents of 2 particles per state (in the true frame) against the
    state's true map, and that of the run's consensus map.mrc against the same maps."""
    from cryohet.io.mrc import read_map
    from cryohet.models.base import load_volume_model
    from cryohet.validation.metrics import volume_fsc
    from cryohet.validation.poses import map_in_true_frame

    with np.load(d / "ground_truth.npz") as gt:
        state = np.asarray(gt["state"])
    rng = np.random.default_rng(0)
    picks = [int(i) for s in np.unique(state) for i in rng.choice(np.flatnonzero(state == s), 2)]
    model = load_volume_model(run_dir)
    maps = model.volumes(z[picks])
    cons = map_in_true_frame(read_map(run_dir / "map.mrc")[0], errors, apix)
    ours, consensus = [], []
    for i, vol in zip(picks, maps, strict=True):
        ref = read_map(d / "maps" / f"state_{state[i]:03d}.mrc")[0]
        ours.append(volume_fsc(map_in_true_frame(vol, errors, apix), ref, apix)["auc"])
        consensus.append(volume_fsc(cons, ref, apix)["auc"])
    return float(np.mean(ours)), float(np.mean(consensus))


def score(d: Path, A: np.ndarray, s: np.ndarray, z: np.ndarray) -> tuple[dict[str, Any], Any]:
    from cryohet.validation.metrics import spearman_pc1
    from cryohet.validation.poses import pose_errors

    A_true, s_true = truth(d)
    e = pose_errors(A, s, A_true, s_true)
    with np.load(d / "ground_truth.npz") as gt:
        rho = spearman_pc1(z, np.asarray(gt["tau"]))
    return {"median_angle_deg": e.median_angle_deg, "within_10deg": float((e.angle_deg < 10).mean()),
            "median_shift_A": e.median_shift_A, "mirrored": bool(e.mirrored), "spearman_pc1": rho}, e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--search_high_A", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cryodrgn", default="")
    ap.add_argument("--cryodrgn_epochs", type=int, default=2)
    ap.add_argument("--cryodrgn_options", default="",
                    help="further `cryodrgn abinit` options, one string (e.g. the CPU settings of the module's "
                         "docstring: --dim 64 --pe-dim 32 --base-healpy 1 --nkeptposes 4)")
    ap.add_argument("--rescore", action="store_true",
                    help="score the cryohet runs already in --out instead of running them again (cost NaN)")
    ap.add_argument("--only", default="", help="comma-separated rows to run: het, hom, drgn (default: all)")
    a = ap.parse_args()
    d = a.out / f"data_n{a.n}_b{a.box}_snr{a.snr:g}"
    if not (d / NOPOSE_STAR).exists():
        d.mkdir(parents=True, exist_ok=True)
        make_data(d, a.n, a.box, a.snr, a.seed)
    apix = FOV_A / a.box
    rows = set(a.only.split(",")) if a.only else {"het", "hom", "drgn"}
    results_path = a.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    common = dict(particles=str(d / NOPOSE_STAR), threads=a.threads, seed=a.seed)
    if "het" in rows:
        out = a.out / "het"
        cost = run("abinit_het", {**common, **NET, "local_iterations": 2, "rounds": a.rounds, "epochs": a.epochs,
                                  "search_high_A": a.search_high_A}, out, a.rescore)
        A, s = star_poses(d, out / "particles.star")
        z = np.load(out / "z.npy")
        r, e = score(d, A, s, z)
        r["fsc_auc"], r["consensus_fsc_auc"] = per_image_auc(d, out, z, e, apix)
        A0, s0 = star_poses(d, out / "particles_consensus.star")
        r["consensus_median_angle_deg"] = score(d, A0, s0, z)[0]["median_angle_deg"]
        results["cryohet abinit-het"] = {**r, **asdict(cost), "rounds": a.rounds, "epochs": a.epochs}
        results_path.write_text(json.dumps(results, indent=1))
    if "hom" in rows:
        out = a.out / "hom"
        cost = run("abinit", {**common, "local_iterations": 2}, out, a.rescore)
        vae = a.out / "hom_vae"
        cost += run("train_vae", {**common, **NET, "particles": str(out / "particles.star"),
                                  "epochs": (a.rounds + 1) * a.epochs, "batch_size": 32}, vae, a.rescore)
        A, s = star_poses(d, out / "particles.star")
        z = np.load(vae / "z.npy")
        r, e = score(d, A, s, z)
        shutil.copy(out / "map.mrc", vae / "map.mrc")
        r["fsc_auc"], r["consensus_fsc_auc"] = per_image_auc(d, vae, z, e, apix)
        results["cryohet abinit + train-vae"] = {**r, **asdict(cost), "epochs": (a.rounds + 1) * a.epochs}
        results_path.write_text(json.dumps(results, indent=1))
    if "drgn" in rows and a.cryodrgn:
        work = a.out / "cryodrgn"
        cost = run_cryodrgn(a.cryodrgn, d, work, a.cryodrgn_epochs, a.threads, a.seed,
                            ("--zdim", "1", "--num-workers", "0", *shlex.split(a.cryodrgn_options)))
        pkl = last_pose_pkl(work / "run")
        A, s = cryodrgn_conventions(pkl, a.box, apix)["A = R, origin = +t px"]
        from cryohet.validation.external import load_numpy_pickle

        zpkl = pkl.with_name(pkl.name.replace("pose.", "z."))
        z = np.asarray(load_numpy_pickle(zpkl), dtype=np.float64).reshape(len(A), -1)
        r, _ = score(d, A, s, z)
        name = f"cryoDRGN 4.3.1 abinit --zdim 1 -n {a.cryodrgn_epochs} {a.cryodrgn_options}".strip()
        results[name] = {**r, **asdict(cost), "pose_file": str(pkl)}
    results_path.write_text(json.dumps(results, indent=1))
    print("| program | median angle error (°) | within 10° | median origin error (Å) | latent |Spearman| PC1 | "
          "per-image FSC AUC | wall (s) | CPU (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        auc = f"{r['fsc_auc']:.3f} (consensus {r['consensus_fsc_auc']:.3f})" if "fsc_auc" in r else "-"
        print(f"| {name} | {r['median_angle_deg']:.2f} | {100 * r['within_10deg']:.0f} % | "
              f"{r['median_shift_A']:.2f} | {r['spearman_pc1']:.2f} | {auc} | {r['wall_s']:.0f} | "
              f"{r['cpu_s']:.0f} | {1000 * r['peak_gb']:.0f} |")


if __name__ == "__main__":
    main()
