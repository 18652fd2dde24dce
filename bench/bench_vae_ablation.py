"""Ablation of ``train-vae``'s defaults on one benchmark, side by side with cryoDRGN 4.3.1 and a homogeneous map.

One dataset (``benchmark-make``: by default the AdK open→closed interpolation, box 32, 2000 particles, SNR 0.1),
one seed; ``train-vae`` at its defaults and with one change at a time (``--config NAME:JSON`` adds or replaces
a row: the JSON holds train-vae parameters), cryoDRGN's ``train_vae`` at its defaults but with the encoder and
decoder width given by ``--cryodrgn_dim`` (its default 1024 is ~16× the FLOPs of 256 and does not fit a CPU
session; 0 keeps 1024), and ``cryohet reconstruct``'s map given to every particle. Every result is scored by
the same ``cryohet.validation.score`` (per-image FSC AUC of the map at each sampled particle's latent against
its true map; |Spearman| of the latent's PC1 with τ; 5-fold kNN R² of τ). Time: the CPU seconds of each
program's process (user + system, start-up and final latents included), one thread each. Prints a Markdown table
with the ratios to cryoDRGN; rows are appended to ``OUT/results.jsonl`` as they finish (a rerun skips the rows
already there).

    .venv/bin/python bench/bench_vae_ablation.py --out /tmp/vae_ablation \\
        --cryodrgn /path/to/cryodrgn-venv/bin/cryodrgn --cryodrgn_dim 256
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: name -> train-vae parameters changed from the defaults (one change at a time, then the chosen combination)
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "epochs 8": {"epochs": 8},
    "freq_march 0.5": {"freq_march": 0.5},
    "freq_march 0.8": {"freq_march": 0.8},
    "lr 3e-4": {"lr": 3e-4},
}

#: how the volumes are scored (set from the command line)
SCORE: dict[str, int] = {"n_per_state": 4, "max_states": 20}

_OURS = textwrap.dedent("""
    import json, sys
    from cryohet.runner import run_method
    from cryohet.methods.train_vae import METHOD
    run_method(METHOD, {"overwrite": True, **json.loads(sys.argv[1])}, sys.argv[2])
""")


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(args: list[str], log: Path) -> tuple[float, float]:
    """(wall s, CPU s) of a child process, its output to ``log``; RuntimeError when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CRYOHET_NO_PROGRESS="1")
    c0, t0 = _child_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc:
        raise RuntimeError(f"{args[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0, _child_cpu() - c0


def _row(name: str, summary: dict[str, Any], latent: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    m = (latent or {}).get("metrics", {})
    return {"name": name, "fsc_auc": summary.get("fsc_auc"), "res_0.5_A": summary.get("res_0.5_A"),
            "spearman_pc1": m.get("spearman_pc1"), "knn_r2": m.get("knn_r2"), **extra}


def ours(name: str, over: dict[str, Any], data: Path, out: Path) -> dict[str, Any]:
    from cryohet.validation.score import score_run

    run = out / "runs" / name.replace(" ", "_").replace(",", "")
    params = {"particles": str(data / "particles.star"), "threads": 1, "seed": 0, **over}
    wall, cpu = _run([sys.executable, "-c", _OURS, json.dumps(params), str(run)], run.with_suffix(".log"))
    hist = json.loads((run / "config.json").read_text())["history"]
    res = score_run(run, data, **SCORE)
    return _row(name, res["summary"], res["latent"], params=over, wall_s=wall, cpu_s=cpu,
                train_cpu_s=sum(h["cpu_seconds"] for h in hist))


def cryodrgn(exe: str, dim: int, data: Path, out: Path) -> dict[str, Any]:
    from cryohet.validation.score import score_cryodrgn

    work = out / "cryodrgn"
    work.mkdir(parents=True, exist_ok=True)
    star = str(data / "particles.star")
    _run([exe, "parse_pose_star", star, "-o", str(work / "pose.pkl")], work / "parse_pose.log")
    _run([exe, "parse_ctf_star", star, "--ps", "0", "-o", str(work / "ctf.pkl")], work / "parse_ctf.log")
    args = [exe, "train_vae", star, "--poses", str(work / "pose.pkl"), "--ctf", str(work / "ctf.pkl"), "--zdim", "8",
            "--seed", "0", "--max-threads", "1", "--no-analysis", "-o", str(work / "run")]
    if dim:
        args += ["--enc-dim", str(dim), "--dec-dim", str(dim)]
    wall, cpu = _run(args, work / "train.log")
    os.environ["PATH"] = str(Path(exe).parent) + os.pathsep + os.environ["PATH"]
    z = sorted((work / "run").glob("z.*.pkl"), key=lambda p: int(p.stem.split(".")[1]))[-1]
    w = z.with_name("weights." + z.name.split(".", 1)[1])
    sc = {f: score_cryodrgn(z, data, weights=w, config=work / "run" / "config.yaml", flip=f, **SCORE)
          for f in (False, True)}
    best = max(sc, key=lambda f: sc[f]["summary"]["fsc_auc"])
    return _row(f"cryoDRGN 4.3.1 (width {dim or 1024})", sc[best]["summary"], sc[best]["latent"], wall_s=wall,
                cpu_s=cpu, train_cpu_s=cpu, flip=best)


def homogeneous(data: Path, out: Path) -> dict[str, Any]:
    from cryohet.methods.reconstruct import METHOD
    from cryohet.runner import run_method
    from cryohet.validation.score import score_arrays

    run = out / "runs" / "reconstruct"
    t0 = time.perf_counter()
    run_method(METHOD, dict(particles=str(data / "particles.star"), threads=1, overwrite=True), run)
    wall = time.perf_counter() - t0
    (run / "maps").mkdir(exist_ok=True)
    (run / "maps" / "map.mrc").write_bytes((run / "map.mrc").read_bytes())
    n = len(np.load(data / "ground_truth.npz")["tau"])
    res = score_arrays(np.zeros((n, 1), np.float32), data, volumes_dir=run / "maps", volume_labels=np.zeros(n, int),
                       **SCORE)
    return _row("homogeneous map (reconstruct)", res["summary"], None, wall_s=wall)


def table(rows: list[dict[str, Any]]) -> str:
    drgn = next((r for r in rows if r["name"].startswith("cryoDRGN")), None)
    lines = ["| run | CPU s | CPU / cryoDRGN | per-image FSC AUC | AUC − cryoDRGN's | FSC 0.5 (Å) | "
             "\\|Spearman\\| PC1 | kNN R² |", "|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        ratio = r["cpu_s"] / drgn["cpu_s"] if drgn and r.get("cpu_s") else None
        diff = r["fsc_auc"] - drgn["fsc_auc"] if drgn and r.get("fsc_auc") is not None else None
        lines.append(f"| {r['name']} | {f(r.get('cpu_s'), '.0f')} | {f(ratio, '.2f')} | "
                     f"{f(r.get('fsc_auc'), '.3f')} | {f(diff, '+.3f')} | {f(r.get('res_0.5_A'), '.1f')} | "
                     f"{f(r.get('spearman_pc1'), '.3f')} | {f(r.get('knn_r2'), '.3f')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", default="interpolation")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--data_seed", type=int, default=0, help="seed of the simulated dataset")
    p.add_argument("--n_per_state", type=int, default=4, help="particles per true state in the volume FSC")
    p.add_argument("--max_states", type=int, default=20, help="true states in the volume FSC")
    p.add_argument("--config", action="append", default=[], metavar="NAME:JSON",
                   help="an extra train-vae row (parameters changed from the defaults)")
    p.add_argument("--only", nargs="*", default=None, help="run only these train-vae rows")
    p.add_argument("--cryodrgn", default="", help="cryoDRGN 4.3.1's executable (empty: no cryoDRGN row)")
    p.add_argument("--cryodrgn_dim", type=int, default=256, help="cryoDRGN's encoder and decoder width (0: 1024)")
    a = p.parse_args()
    from cryohet.validation.datasets import make_dataset

    SCORE.update(n_per_state=a.n_per_state, max_states=a.max_states)
    configs = dict(CONFIGS)
    for c in a.config:
        name, _, js = c.partition(":")
        configs[name] = json.loads(js)
    if a.only is not None:
        configs = {k: v for k, v in configs.items() if k in a.only}
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "data"
    if not (data / "benchmark.json").exists():
        make_dataset(a.dataset, data, box=a.box, n_particles=a.n, snr=a.snr, seed=a.data_seed)
    log = a.out / "results.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log.read_text().splitlines()} \
        if log.exists() else {}
    jobs: list[tuple[str, Any]] = [("homogeneous map (reconstruct)", lambda: homogeneous(data, a.out))]
    jobs += [(k, lambda k=k, v=v: ours(k, v, data, a.out)) for k, v in configs.items()]
    if a.cryodrgn:
        jobs.append((f"cryoDRGN 4.3.1 (width {a.cryodrgn_dim or 1024})",
                     lambda: cryodrgn(a.cryodrgn, a.cryodrgn_dim, data, a.out)))
    for name, job in jobs:
        if name not in done:
            done[name] = job()
            with open(log, "a") as fh:
                fh.write(json.dumps(done[name], default=float) + "\n")
            print(json.dumps(done[name], default=float), flush=True)
    print(table([done[name] for name, _ in jobs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
