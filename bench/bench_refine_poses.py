"""``cryohet train-vae --refine_poses`` against cryoDRGN 4.3.1's ``train_vae --do-pose-sgd`` on perturbed poses.

A simulated hinge dataset (``validation.datasets.make_dataset("hinge")``, true poses known) has every pose turned by
``--perturb_deg`` about a random axis and its origin moved by ``--perturb_A`` (``perturbed.star``); each program
trains on it with and without pose refinement, with the same architecture, latent dimension, batch size, learning
rate, epochs and threads. Reported per run: median angle and origin error of its final poses against the truth
(no global alignment: every program starts in the true frame), |Spearman| of the latent's first PC with τ, the
per-image volume FSC AUC against each particle's true map (``validation.score``, the same code for both), and the
wall time.

cryoDRGN's inputs come from its own ``parse_pose_star`` / ``parse_ctf_star`` of ``perturbed.star``; pose SGD needs
its Hartley domain (``--domain hartley``); its poses (``pose.pkl``) are read with the restricted unpickler
(``validation.external.load_numpy_pickle``) and turned back into RELION matrices and origins by the convention that
maps its parsed input poses onto ours (checked on the input, reported).

On the CPU cryoDRGN 4.3.1's pose SGD divides its translation table by D at every epoch's save (see
``bench/cryodrgn_pose_save.py``); ``--cryodrgn_patched`` names an executable that runs cryoDRGN through that file, to
measure its pose SGD without the bug as well.

``cryohet principal-volumes`` (K ``--pv_components``, 10 Å) runs on the same perturbed STAR without and with
``--refine_poses`` (one row per ``--pv_rounds``): its poses are refined by local search between PPCA fits.

    .venv/bin/python bench/bench_refine_poses.py --out /tmp/bench_refine_poses --cryodrgn /path/to/cryodrgn \
        --cryodrgn_patched /path/to/cryodrgn_patched
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent
#: the scores kept per run (``validation.score``'s summary): |Spearman| of PC1 with τ, per-image FSC AUC
SCORES = ("latent_metric", "latent_score", "fsc_auc", "mean_map_fsc_auc")

_OURS = textwrap.dedent("""
    import json, sys
    from cryohet.runner import run_method
    from cryohet.methods.{module} import METHOD
    run_method(METHOD, {{"overwrite": True, **json.loads(sys.argv[1])}}, sys.argv[2])
""")


def run(args: list[str], log: Path, threads: int) -> dict[str, float]:
    """Wall and CPU seconds of a command (argument list), its output to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CRYOHET_NO_PROGRESS="1")
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}); see {log}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)}


def perturbed_star(data: Path, deg: float, shift_A: float, seed: int) -> Path:
    """``data/perturbed.star``: the true poses turned by ``deg`` about random axes and moved by ``shift_A``."""
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._pose_outputs import pose_columns
    from cryohet.validation.poses import perturb_poses

    pset = load_particles(data / "particles.star")
    euler, shift = perturb_poses(pset.euler_deg, pset.shift_A, deg, shift_A, np.random.default_rng(seed))
    bad = dataclasses.replace(pset, euler_deg=euler, shift_A=shift)
    write_particles_star(data / "perturbed.star", bad, extra_columns=pose_columns(bad), cs=False)
    return data / "perturbed.star"


def pose_error(A: np.ndarray, shift_A: np.ndarray, truth: Any) -> dict[str, float]:
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.validation.poses import direct_errors

    ang, sh = direct_errors(A, shift_A, euler_to_matrix(truth.euler_deg), truth.shift_A)
    return {"median_angle_deg": float(np.median(ang)), "median_origin_A": float(np.median(sh))}


def drgn_convention(pkl: Path, pset: Any) -> dict[str, Any]:
    """How cryoDRGN's (rot, trans) map onto RELION's A and origins: the transpose or not and the sign and unit
    of trans that reproduce ``pset``'s poses from its ``parse_pose_star`` output ``pkl``."""
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.validation.external import load_numpy_pickle

    rot, trans = load_numpy_pickle(pkl)
    A = euler_to_matrix(pset.euler_deg)
    transpose = bool(np.abs(np.transpose(rot, (0, 2, 1)) - A).max() < np.abs(rot - A).max())
    origin_px = pset.shift_A / pset.apix
    sign = float(np.sign(np.sum(trans * origin_px)))
    fit = np.abs(sign * trans * pset.box - origin_px).max()
    return {"transpose": transpose, "sign": sign, "rot_residual": float(np.abs(
        (np.transpose(rot, (0, 2, 1)) if transpose else rot) - A).max()), "origin_residual_px": float(fit)}


def drgn_poses(pkl: Path, conv: dict[str, Any], box: int, apix: float) -> tuple[np.ndarray, np.ndarray]:
    from cryohet.validation.external import load_numpy_pickle

    rot, trans = load_numpy_pickle(pkl)
    A = np.transpose(rot, (0, 2, 1)) if conv["transpose"] else np.asarray(rot)
    return A.astype(np.float64), conv["sign"] * np.asarray(trans, dtype=np.float64) * box * apix


def trained_before(out: Path) -> dict[str, Any]:
    """The wall time of a cryoDRGN run already in ``out`` (its log's "Finished in"; CPU time unknown)."""
    found = re.findall(r"Finished in (\d+):(\d+):([\d.]+) \(", (out / "run.log").read_text())
    h, m, sec = found[-1] if found else ("nan", "0", "0")
    return {"wall_s": float(h) * 3600 + float(m) * 60 + float(sec), "cpu_s": float("nan"), "reused": True}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=600, help="particles")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--perturb_deg", type=float, default=5.0)
    p.add_argument("--perturb_A", type=float, default=1.5)
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--drgn_pose_lr", type=float, nargs="+", default=[3e-4, 3e-3],
                   help="cryoDRGN --pose-lr values to run (its default 3e-4)")
    p.add_argument("--drgn_plain", action="store_true", help="also run cryoDRGN without pose SGD")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_per_state", type=int, default=3)
    p.add_argument("--cryodrgn", default="/work/cryodrgn-venv/bin/cryodrgn")
    p.add_argument("--skip_cryodrgn", action="store_true")
    p.add_argument("--cryodrgn_patched", default="", help="also run cryoDRGN's pose SGD with this executable: "
                   "cryoDRGN with PoseTracker.save patched to copy its translation table before dividing it by D "
                   "(on the CPU 4.3.1 divides the live table at every epoch's save, so its origins shrink to 0)")
    p.add_argument("--drgn_flip", choices=("auto", "yes", "no"), default="auto",
                   help="score cryoDRGN's maps mirrored (eval_vol --flip), as written, or both keeping the better")
    p.add_argument("--pv_components", type=int, default=2, help="principal-volumes rows: K")
    p.add_argument("--pv_rounds", type=int, nargs="*", default=[1, 2],
                   help="principal-volumes --refine_poses rows: their --pose_rounds (a row without refinement too)")
    p.add_argument("--reuse", action="store_true", help="keep the runs already in OUT/results.json")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.io.particles import load_particles
    from cryohet.validation.datasets import load_dataset, make_dataset
    from cryohet.validation.score import score_cryodrgn, score_run

    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                               "load_average_start": os.getloadavg(), "runs": {}}
    if a.reuse and (a.out / "results.json").exists():  # the runs measured already are kept
        results["runs"] = json.loads((a.out / "results.json").read_text()).get("runs", {})

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(results, indent=1, default=float))

    data = a.out / "data"
    if not (data / "benchmark.json").exists():
        make_dataset("hinge", data, box=a.box, n_particles=a.n, snr=a.snr, seed=a.seed)
    ds = load_dataset(data)
    truth = load_particles(data / "particles.star")
    star = perturbed_star(data, a.perturb_deg, a.perturb_A, a.seed + 7)
    start = load_particles(star)
    results["perturbed"] = pose_error(euler_to_matrix(start.euler_deg), start.shift_A, truth)
    kw = dict(n_per_state=a.n_per_state)

    def ours(label: str, module: str, values: dict[str, Any], out: Path) -> None:
        """Run a cryohet method on the perturbed STAR, score its poses, latents and maps, record the row."""
        cost = run([sys.executable, "-c", _OURS.format(module=module), json.dumps(values), str(out)],
                   out.with_suffix(".log"), a.threads)
        got = load_particles(out / "particles.star")
        s = score_run(out, data, **kw)["summary"]
        results["runs"][label] = {**cost, **pose_error(euler_to_matrix(got.euler_deg), got.shift_A, truth),
                                  **{k: s[k] for k in s if k in SCORES}}
        print(label, results["runs"][label], flush=True)
        save()

    for refine in (False, True):
        label = f"cryohet train-vae{' --refine_poses' if refine else ''}"
        if label in results["runs"]:
            continue
        values = dict(particles=str(star), zdim=a.zdim, epochs=a.epochs, batch_size=a.batch, lr=a.lr,
                      enc_dim=a.dim, dec_dim=a.dim, threads=a.threads, seed=a.seed, refine_poses=refine)
        ours(label, "train_vae", values, a.out / f"ours_{int(refine)}")

    for rounds in (0, *a.pv_rounds):
        label = "cryohet principal-volumes" + (f" --refine_poses --pose_rounds {rounds}" if rounds else "")
        if label in results["runs"]:
            continue
        values = dict(particles=str(star), n_components=a.pv_components, resolution_A=10.0, threads=a.threads,
                      seed=a.seed, movie_frames=2, refine_poses=rounds > 0, pose_rounds=max(1, rounds))
        ours(label, "principal_volumes", values, a.out / f"pv_{rounds}")

    if not a.skip_cryodrgn:
        exe = a.cryodrgn
        os.environ["PATH"] = os.environ["PATH"] + os.pathsep + str(Path(exe).parent)
        work = a.out / "cryodrgn_inputs"
        work.mkdir(exist_ok=True)
        pose, ctf = work / "pose.pkl", work / "ctf.pkl"
        run([exe, "parse_pose_star", str(star), "-o", str(pose)], work / "parse_pose.log", a.threads)
        run([exe, "parse_ctf_star", str(star), "--ps", "0", "-o", str(ctf)], work / "parse_ctf.log", a.threads)
        conv = drgn_convention(pose, start)
        results["cryodrgn_convention"] = conv
        variants = [(exe, "", None)] if a.drgn_plain else []
        for pose_lr in a.drgn_pose_lr:
            variants.append((exe, "", pose_lr))
            if a.cryodrgn_patched:
                variants.append((a.cryodrgn_patched, " (save patched)", pose_lr))
        for program, tag, pose_lr in variants:
            label = "cryoDRGN 4.3.1 train_vae --domain hartley" + (
                f" --do-pose-sgd --pose-lr {pose_lr:g}" if pose_lr else "") + tag
            if label in results["runs"]:
                continue
            name = "plain" if not pose_lr else f"pose_lr_{pose_lr:g}".replace(".", "p") + ("_patched" if tag else "")
            out = a.out / f"cryodrgn_{name}"
            args = [program, "train_vae", str(star), "--poses", str(pose), "--ctf", str(ctf), "--zdim", str(a.zdim),
                    "-n", str(a.epochs), "-b", str(a.batch), "--lr", str(a.lr), "--enc-dim", str(a.dim),
                    "--dec-dim", str(a.dim), "--domain", "hartley", "--seed", str(a.seed), "--max-threads",
                    str(a.threads), "--no-analysis", "-o", str(out)]
            if pose_lr:
                args += ["--do-pose-sgd", "--pose-lr", str(pose_lr)]
            try:
                row: dict[str, Any] = (trained_before(out) if a.reuse and (out / "z.pkl").exists()
                                       else run(args, out.with_suffix(".log"), a.threads))
            except RuntimeError as exc:
                results["runs"][label] = {"error": str(exc)}
                continue
            if pose_lr:
                row.update(pose_error(*drgn_poses(out / "pose.pkl", conv, ds.box, ds.apix), truth))
            else:
                row.update(results["perturbed"])
            # its maps are scored as written and mirrored (eval_vol --flip), the better kept (as bench_vae.py)
            flips = {"auto": (False, True), "no": (False,), "yes": (True,)}[a.drgn_flip]
            scores = {flip: score_cryodrgn(out / "z.pkl", data, weights=out / "weights.pkl",
                                           config=out / "config.yaml", flip=flip, **kw)["summary"]
                      for flip in flips}
            best = max(scores, key=lambda f: scores[f].get("fsc_auc", 0.0))
            s = scores[best]
            row["flip"] = best
            row.update({k: s[k] for k in s if k in SCORES})
            results["runs"][label] = row
            print(label, row, flush=True)
            save()
    results["load_average_end"] = os.getloadavg()
    save()
    print(report(results))
    return 0


def report(r: dict[str, Any]) -> str:
    lines = ["| program | median angle error (°) | median origin error (Å) | latent |Spearman| | per-image FSC AUC "
             "| wall (s) | CPU (s) |", "|---|---|---|---|---|---|---|",
             f"| input (perturbed) | {r['perturbed']['median_angle_deg']:.2f} | "
             f"{r['perturbed']['median_origin_A']:.2f} | - | - | - | - |"]
    for label, row in r["runs"].items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | | | |")
            continue
        lines.append(f"| {label} | {row['median_angle_deg']:.2f} | {row['median_origin_A']:.2f} | "
                     f"{row.get('latent_score', float('nan')):.3f} | {row.get('fsc_auc', float('nan')):.3f} | "
                     f"{row['wall_s']:.0f} | {row['cpu_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
