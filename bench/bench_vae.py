"""Benchmark ``cryohet train-vae`` against cryoDRGN's ``train_vae`` on one synthetic dataset with ground truth.

Both run side by side on the same particles (a simulated hinge motion of the bundled adenylate kinase,
with the true map and τ of every particle), with the same architecture (layers × width of encoder and
decoder, latent dimension), batch size, learning rate, epochs and thread count. Reported:

* time per epoch: CPU seconds (the difference between an E-epoch and a 1-epoch run, divided by E − 1,
  so start-up, data loading and the final latent pass cancel; robust to other load on the machine) and
  the wall seconds each program logs per epoch;
* accuracy: |Spearman| of the latent's first principal component with the true τ, and the per-particle
  volume FSC against the particle's true map (area under the FSC curve, as CryoBench reports it),
  both from ``cryohet.validation.score`` (the same code for both programs);
* memory: peak resident memory gained (VmHWM, reset before the pass) while streaming a full shuffled pass
  over memory-mapped stacks of ``--memory_particles`` images (default 10^4 and 10^6 images of 16×16 px,
  the 1 GB file written and deleted here).

cryoDRGN runs from its own virtual environment (``--cryodrgn``, default /work/cryodrgn-venv/bin/cryodrgn;
``python3 -m venv /work/cryodrgn-venv && /work/cryodrgn-venv/bin/pip install cryodrgn==4.3.1 torch==2.13.0``),
always through an argument list. Its pose and CTF inputs are made by its own ``parse_pose_star`` and
``parse_ctf_star`` from our STAR file.

    .venv/bin/python bench/bench_vae.py --out /tmp/bench_vae --repeat 3 --skip_fp32   # as in docs/benchmarks/vae.md
    .venv/bin/python bench/bench_vae.py --out /tmp/bench_vae --skip_memory --skip_scores --epochs 4  # time only
    # accuracy of one train-vae setting, ours only (latent, neighbourhood similarity, maps), training seed 1
    .venv/bin/python bench/bench_vae.py --out /tmp/hinge_learnt_s1 --seed 1 --skip_cryodrgn --skip_fp32 \
        --skip_memory --vae '{"filters_from": "learnt"}'
"""
from __future__ import annotations

import argparse
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


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(args: list[str], log: Path, env: dict[str, str]) -> dict[str, float]:
    """Run a command (argument list), its output to ``log``; wall and CPU seconds of the child."""
    c0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": wall, "cpu_s": cpu}


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CRYOHET_NO_PROGRESS="1")
    return env


# --------------------------------------------------------------------------------------------------- ours

_OURS = textwrap.dedent("""
    import json, sys
    from cryohet.runner import run_method
    from cryohet.methods.train_vae import METHOD
    run_method(METHOD, {"overwrite": True, **json.loads(sys.argv[1])}, sys.argv[2])
""")


def run_ours(a: argparse.Namespace, data: Path, out: Path, epochs: int, amp: str) -> dict[str, Any]:
    values = dict(particles=str(data / "particles.star"), zdim=a.zdim, epochs=epochs, batch_size=a.batch,
                  lr=a.lr, enc_layers=a.layers, enc_dim=a.dim, dec_layers=a.layers, dec_dim=a.dim, amp=amp,
                  threads=a.threads, seed=a.seed, **json.loads(a.vae))
    t = run_timed([sys.executable, "-c", _OURS, json.dumps(values), str(out)], out.with_suffix(".log"),
                  thread_env(a.threads))
    hist = json.loads((out / "config.json").read_text())["history"]
    t["epoch_wall_s"] = [h["seconds"] for h in hist]
    t["epoch_cpu_s_inside"] = [h["cpu_seconds"] for h in hist]
    return t


# --------------------------------------------------------------------------------------------------- cryoDRGN

def cryodrgn_prepare(exe: str, data: Path, work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    pose, ctf = work / "pose.pkl", work / "ctf.pkl"
    star = str(data / "particles.star")
    run_timed([exe, "parse_pose_star", star, "-o", str(pose)], work / "parse_pose.log", env)
    # our STAR has no rlnPhaseShift column: without --ps cryoDRGN stores NaN and its CTF is NaN
    run_timed([exe, "parse_ctf_star", star, "--ps", "0", "-o", str(ctf)], work / "parse_ctf.log", env)
    return pose, ctf


def run_cryodrgn(a: argparse.Namespace, exe: str, data: Path, pose: Path, ctf: Path, out: Path,
                 epochs: int) -> dict[str, Any]:
    args = [exe, "train_vae", str(data / "particles.star"), "--poses", str(pose), "--ctf", str(ctf),
            "--zdim", str(a.zdim), "-n", str(epochs), "-b", str(a.batch), "--lr", str(a.lr),
            "--enc-layers", str(a.layers), "--enc-dim", str(a.dim), "--dec-layers", str(a.layers),
            "--dec-dim", str(a.dim), "--seed", str(a.seed), "--max-threads", str(a.threads),
            "--checkpoint", str(epochs), "--no-analysis", "-o", str(out)]
    t = run_timed(args, out.with_suffix(".log"), thread_env(a.threads))
    text = (out / "run.log").read_text() if (out / "run.log").exists() else out.with_suffix(".log").read_text()
    secs = []
    for h, m, s in re.findall(r"=====> Epoch: \d+ .*Finished in (\d+):(\d+):([\d.]+)", text):
        secs.append(int(h) * 3600 + int(m) * 60 + float(s))
    t["epoch_wall_s"] = secs
    return t


# --------------------------------------------------------------------------------------------------- memory

_WRITE = textwrap.dedent("""
    import sys
    import numpy as np, mrcfile
    path, n = sys.argv[1], int(sys.argv[2])
    with mrcfile.new_mmap(path, shape=(n, 16, 16), mrc_mode=2, overwrite=True) as m:
        for s in range(0, n, 50000):
            m.data[s:s + 50000] = np.random.default_rng(s).normal(size=(min(50000, n - s), 16, 16))
""")

_STREAM = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from cryohet.data.loader import BatchStream, ImageReader, epoch_order, shard_batches

    def status():
        out = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                key, val = line.split(":")
                out[key] = int(val.split()[0])
        return out

    path, n = sys.argv[1], int(sys.argv[2])
    reader = ImageReader([path], np.zeros(n, np.int64), np.arange(n))
    order = epoch_order(n, 1, 0, True, reader.file_order())
    batches = shard_batches(order, 256)
    with open("/proc/self/clear_refs", "w") as fh:   # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = status()
    t = time.perf_counter()
    total = 0
    for b in BatchStream(reader, batches):
        total += len(b.rows)
    secs = time.perf_counter() - t
    after = status()
    print(json.dumps({"n": n, "images_streamed": total, "seconds": secs, "rss_before_pass_kB": before["VmRSS"],
                      "peak_rss_kB": after["VmHWM"], "growth_during_pass_kB": after["VmHWM"] - before["VmRSS"],
                      "rss_after_pass_kB": after["VmRSS"], "anon_after_pass_kB": after["RssAnon"],
                      "anon_before_pass_kB": before["RssAnon"]}))
""")


def memory_bench(out: Path, sizes: list[int]) -> list[dict[str, Any]]:
    res = []
    for n in sizes:
        stack = out / f"mem_{n}.mrcs"
        try:
            subprocess.run([sys.executable, "-c", _WRITE, str(stack), str(n)], check=True)
            # drop the file's pages from the page cache is not possible without root tools; the pass
            # maps each window only while reading it, so page-cache residency does not count here
            p = subprocess.run([sys.executable, "-c", _STREAM, str(stack), str(n)], check=True,
                               capture_output=True, text=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["stack_MB"] = stack.stat().st_size / 2**20
            res.append(r)
            print("memory:", r, flush=True)
        finally:
            stack.unlink(missing_ok=True)
    return res


# --------------------------------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=2000, help="particles")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the programs' training seed")
    p.add_argument("--data_seed", type=int, default=0, help="the simulated particles' seed")
    p.add_argument("--n_per_state", type=int, default=3, help="particles per true state for the volume FSC")
    p.add_argument("--cryodrgn", default="/work/cryodrgn-venv/bin/cryodrgn")
    p.add_argument("--skip_cryodrgn", action="store_true")
    p.add_argument("--skip_fp32", action="store_true", help="do not also train ours in float32")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_scores", action="store_true", help="time only (no accuracy)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the timing runs, interleaved, and take medians")
    p.add_argument("--memory_particles", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--vae", default="{}", help="further train-vae parameters of ours, JSON (e.g. "
                   "'{\"filters_from\": \"learnt\"}')")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from cryohet.validation.datasets import load_dataset, make_dataset
    from cryohet.validation.external import load_latents
    from cryohet.validation.score import score_cryodrgn, score_run

    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                               "load_average_start": os.getloadavg()}
    res_path = a.out / "results.json"

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=1, default=float))

    data = a.out / "data"
    if not (data / "benchmark.json").exists():
        make_dataset("hinge", data, box=a.box, n_particles=a.n, snr=a.snr, seed=a.data_seed)
    ds = load_dataset(data)
    results["dataset"] = {"name": ds.name, "n": ds.n_particles, "box": ds.box, "apix": ds.apix, "snr": a.snr}
    kw = dict(n_per_state=a.n_per_state)

    # timing: 1-epoch and E-epoch runs of every program, interleaved, repeated; medians of the differences
    programs: list[tuple[str, Any]] = [("cryohet (bf16 autocast)", "yes")]
    if not a.skip_fp32:
        programs.append(("cryohet (float32)", "no"))
    exe = a.cryodrgn
    if not a.skip_cryodrgn:
        try:
            pose, ctf = cryodrgn_prepare(exe, data, a.out / "cryodrgn_inputs", thread_env(a.threads))
            programs.append(("cryoDRGN 4.3.1", (pose, ctf)))
        except (OSError, RuntimeError) as exc:
            results["cryoDRGN 4.3.1"] = {"error": f"could not prepare cryoDRGN's inputs: {exc}"}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in programs}
    for rep in range(a.repeat):
        for label, what in programs:
            try:
                if label.startswith("cryoDRGN"):
                    pose, ctf = what
                    t1 = run_cryodrgn(a, exe, data, pose, ctf, a.out / "cryodrgn_1", 1)
                    te = run_cryodrgn(a, exe, data, pose, ctf, a.out / f"cryodrgn_{a.epochs}", a.epochs)
                else:
                    tag = "ours_" + what
                    t1 = run_ours(a, data, a.out / f"{tag}_1", 1, what)
                    te = run_ours(a, data, a.out / f"{tag}_{a.epochs}", a.epochs, what)
            except (OSError, RuntimeError) as exc:
                results[label] = {"error": str(exc)}
                continue
            runs[label].append({"cpu_s_per_epoch": (te["cpu_s"] - t1["cpu_s"]) / (a.epochs - 1),
                                "wall_s_per_epoch": float(np.mean(te["epoch_wall_s"])), "run_1": t1, "run_E": te})
            print(f"rep {rep + 1}: {label}: {runs[label][-1]['cpu_s_per_epoch']:.2f} CPU s / epoch", flush=True)
    for label, rs in runs.items():
        if rs:
            results[label] = {"cpu_s_per_epoch": float(np.median([r["cpu_s_per_epoch"] for r in rs])),
                              "cpu_s_per_epoch_all": [r["cpu_s_per_epoch"] for r in rs],
                              "wall_s_per_epoch": float(np.median([r["wall_s_per_epoch"] for r in rs])), "runs": rs}
    save()

    if not a.skip_scores:
        for label, what in programs:
            if label not in runs or not runs[label]:
                continue
            if label.startswith("cryoDRGN"):
                d = a.out / f"cryodrgn_{a.epochs}"
                os.environ["PATH"] = os.environ["PATH"] + os.pathsep + str(Path(exe).parent)
                scores = {flip: score_cryodrgn(d / "z.pkl", data, weights=d / "weights.pkl",
                                               config=d / "config.yaml", flip=flip, **kw)["summary"]
                          for flip in (False, True)}
                best = max(scores, key=lambda f: scores[f].get("fsc_auc", 0.0))
                results[label].update(score=scores[best], flip=best, score_other_hand=scores[not best])
                results[label]["score"].update(cryobench_latent_scores(load_latents(d / "z.pkl"), ds))
            else:
                d = a.out / f"ours_{what}_{a.epochs}"
                results[label]["score"] = score_run(d, data, **kw)["summary"]
                results[label]["score"].update(cryobench_latent_scores(np.load(d / "z.npy"), ds))
            print(label, json.dumps(results[label]["score"], default=float), flush=True)
            save()

    if not a.skip_memory:
        results["memory"] = memory_bench(a.out, a.memory_particles)
    results["load_average_end"] = os.getloadavg()
    save()
    print(report(results))
    return 0


def cryobench_latent_scores(z: np.ndarray, ds: Any) -> dict[str, float]:
    """CryoBench's neighbourhood similarity and information imbalance (truth → latent) of latents ``z``."""
    from cryohet.validation.cryobench_score import imbalance_score, neighbourhood_score, truth_embedding

    truth = truth_embedding(ds)
    return {"neighbourhood_similarity": neighbourhood_score(z, truth)["value"],
            "imbalance_truth_to_latent": imbalance_score(z, truth)["truth_to_latent"]}


def report(r: dict[str, Any]) -> str:
    lines = ["| program | CPU s / epoch | wall s / epoch | latent: |Spearman| PC1 vs τ (chance) | "
             "neighbourhood similarity | FSC AUC per particle (chance; mean map) |", "|---|---|---|---|---|---|"]
    for k, v in r.items():
        if isinstance(v, dict) and "cpu_s_per_epoch" in v:
            s = v.get("score", {})
            lines.append(f"| {k} | {v['cpu_s_per_epoch']:.2f} | {v['wall_s_per_epoch']:.2f} | "
                         f"{s.get('latent_score', float('nan')):.3f} ({s.get('latent_chance', float('nan')):.3f}) | "
                         f"{s.get('neighbourhood_similarity', float('nan')):.3f} | "
                         f"{s.get('fsc_auc', float('nan')):.3f} ({s.get('chance_fsc_auc', float('nan')):.3f}; "
                         f"{s.get('mean_map_fsc_auc', float('nan')):.3f}) |")
    drgn = r.get("cryoDRGN 4.3.1", {})
    ours = r.get("cryohet (bf16 autocast)", {})
    if "cpu_s_per_epoch" in drgn and "cpu_s_per_epoch" in ours:
        ratio = ours["cpu_s_per_epoch"] / drgn["cpu_s_per_epoch"]
        lines.append(f"\nCPU time per epoch, cryohet / cryoDRGN: {ratio:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
