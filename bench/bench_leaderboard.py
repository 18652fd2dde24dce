"""Leaderboard on the CryoBench analogues: every cryohet heterogeneity method, cryoDRGN 4.3.1 and RECOVAR 1.0.5
on the same images, scored as CryoBench scores (cryohet.validation.cryobench_score).

    .venv/bin/python bench/bench_leaderboard.py --data /work/peers/cryobench --out /work/peers/cryobench/lb2 \\
        --sets igg-1d ribosembly --n 1000 --epochs 10 --threads 1 --width 256 [--snr 0.1]

Datasets: ``cryohet benchmark-make --dataset <set> --size cpu --n_particles <n>`` into ``--data/<set>`` (made here
when missing; ``--size full`` for the GPU-sized sets; ``--snr`` makes ``<set>-snr<snr>`` at that SNR instead of
the preset's; ``--top_views F`` makes ``<set>[-snr<snr>]-top<F>``, F of the particles near the top view). Rows per
set: the truth (ceiling) and the shuffled truth (chance), the central 95 % of the
neighbourhood similarity of latents without information (``neighbourhood_null``: a value inside it is at chance),
one homogeneous map
(``reconstruct``: every image gets the same map), then each method at its defaults except ``--epochs`` for the
trained ones, ``--width`` for train-vae, and ``--resolution_A`` (the true maps' resolution, 2.5 × the pixel size)
for those whose default (8-10 Å) is finer than the CPU sets' Nyquist (12 Å); ``moments`` at the true maps' support
diameter and a CPU-sized 30 Å limit with 10 CG steps (``MOMENTS_CPU``). A run whose model is not a volume model
(manifold-images' free-energy profile, manifold-volumes' embedding) is scored on its maps (kernel maps along the
coordinate, state maps) at the nearest latent point; ``--mean_latent`` adds a column: each cryohet run's map at
its particles' mean latent given to every image, which separates what the latents add from what the kind of map
gains (``mean_latent_score``). ``kernel-volumes`` maps at train-vae's latents, ``kernel-volumes@moments`` at
moments'. cryoDRGN runs ``train_vae`` (zdim 8,
3 × ``--width`` encoder and decoder layers, as train-vae) from its own environment (``--cryodrgn``;
``python3 -m venv /work/peers/cryodrgn-venv && pip install cryodrgn==4.3.1 torch``), its maps by
``cryodrgn eval_vol`` in both hands, the better kept (CryoBench aligns and flips them too). RECOVAR runs
``recovar pipeline --mask sphere --zdim 4`` and ``recovar compute_state`` at the latents of the scored images, from
its own environment (``--recovar``, its Python; ``pip install recovar==1.0.5 "jax[cpu]==0.9.0.1"``) through
``bench/recovar_cpu.py``, which mends its CPU projector's 2× magnification of upsampled volumes first. Times are
CPU seconds (user + system, this process's and its children's) of each run, scoring excluded. Every run's summary is
kept in ``<out>/<set>/<method>.score.json`` and its CPU time in ``<method>.cpu_s``, and reused, so an interrupted
leaderboard resumes (failed runs are retried); the Markdown table is printed and written to
``<out>/leaderboard.md`` (``--table_only``: from the scored runs only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

import recovar_cpu  # noqa: E402  (beside this script)

from cryohet.methods import get_method  # noqa: E402
from cryohet.runner import run_method  # noqa: E402
from cryohet.validation.cryobench_score import image_indices, neighbourhood_null, truth_embedding  # noqa: E402
from cryohet.validation.datasets import CRYOBENCH, SIZES, load_dataset, make_dataset  # noqa: E402
from cryohet.validation.score import (  # noqa: E402
    score,
    score_arrays,
    score_cryodrgn,
    score_one_map,
    score_run,
    score_true_answer,
)
from cryohet.validation.sources import ParticleVolumes, run_latents, run_volume_model  # noqa: E402

METHODS = ("train-vae", "principal-volumes", "moments", "kernel-volumes", "hypermolecule", "train-gmm", "train-deform",
           "manifold-images", "manifold-volumes", "kernel-volumes@moments", "cryodrgn", "recovar")
LABELS = {"reconstruct": "reconstruct (one map)", "cryodrgn": "cryoDRGN 4.3.1", "recovar": "RECOVAR 1.0.5"}
#: The table's scores are CryoBench's; the older per-state FSC of ``score`` (not in the table) is kept cheap.
SCORE_KW = {"n_per_state": 1, "max_states": 4}
COLUMNS = ("per_image_fsc_auc", "per_state_fsc_auc", "neighbourhood_similarity", "ii_latent_to_truth",
           "ii_truth_to_latent")
#: the optional column (``--mean_latent``): per-image FSC AUC of the run's map at its mean latent, for every image
MEAN_LATENT = "mean_latent_per_image_fsc_auc"


def ensure_dataset(root: Path, name: str, size: str, n: int, snr: float = 0.0, top_views: float = 0.0) -> Path:
    """``root/<name>`` made at the size preset's settings; with ``snr`` that SNR instead, in ``<name>-snr<snr>``;
    with ``top_views`` that fraction of the particles near the top view, in ``<name>[-snr<snr>]-top<fraction>``."""
    d = root / ((f"{name}-snr{snr:g}" if snr else name) + (f"-top{top_views:g}" if top_views else ""))
    if not (d / "benchmark.json").is_file():
        p = SIZES[size]
        make_dataset(name, d, box=p.box, apix=p.apix, n_particles=n or p.n_particles, snr=snr or p.snr,
                     defocus_range_A=p.defocus_range_A, shift_max_px=p.shift_max_px, defocus_lognormal=True,
                     astigmatism_A=p.astigmatism_A, top_view_fraction=top_views)
    return d


def run_logged(args: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")


def cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children so far (all threads)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def thread_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CRYOHET_NO_PROGRESS="1",
                XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}")


# ------------------------------------------------------------------------------------------------- cryohet

def support_diameter_A(ds: Path, rel: float = 0.02, margin_px: int = 1) -> float:
    """Diameter, Å, of the centred ball holding every voxel above ``rel`` × the maximum of any true map (plus a
    margin): the ``--diameter_A`` of ``moments``, whose default (the box) is too many voxels for its covariance."""
    from cryohet.io.mrc import read_map

    dset = load_dataset(ds)
    peak = np.max([np.abs(read_map(p)[0]) for p in dset.map_paths], axis=0)
    c = np.indices(peak.shape) - dset.box // 2
    r_px = np.sqrt((c ** 2).sum(0))[peak > rel * peak.max()].max()
    return float(2 * (r_px + margin_px) * dset.apix)


#: moments on a CPU: its default 20 Å limit puts about 1900 band-limited functions in the 194 Å ball of igg-1d
#: (4945 voxels), and each CG step (a pass computing every image's Q (2p × d') and the operator, 4 r d'² per image)
#: then takes about half an hour of CPU; at 30 Å d' is 560 (1002 at 25 Å) and a step about a minute, and CG (which
#: converges in 10-15 steps on the hinge benchmarks) is stopped after 10
MOMENTS_CPU = {"resolution_A": 30.0, "max_iter": 10}


def cryohet_params(method: str, a: argparse.Namespace, ds: Path, out: Path) -> dict[str, Any]:
    """Defaults except the epochs and, for the methods with a resolution limit, the true maps' resolution."""
    star = str(ds / "particles.star")
    consensus = str(out / "reconstruct" / "map.mrc")
    res = load_dataset(ds).meta["motion"]["resolution_A"]
    return {"train-vae": {"particles": star, "epochs": a.epochs, "enc_dim": a.width, "dec_dim": a.width,
                          **json.loads(a.vae)},
            "principal-volumes": {"particles": star, "resolution_A": res},
            "moments": {"particles": star, "diameter_A": support_diameter_A(ds), "batch_size": 32, **MOMENTS_CPU},
            "hypermolecule": {"particles": star, "resolution_A": res},
            "train-gmm": {"particles": star, "consensus_map": consensus, "epochs": a.epochs, "resolution_A": res},
            "train-deform": {"particles": star, "consensus_map": consensus, "epochs": a.epochs, "resolution_A": res},
            "kernel-volumes": {"run": str(out / "train-vae")},
            "kernel-volumes@moments": {"run": str(out / "moments")},
            "manifold-images": {"particles": star},
            "manifold-volumes": {"particles": star}}[method]


def homogeneous(ds: Path, out: Path, threads: int, n_images: int) -> tuple[dict[str, Any], float]:
    """``reconstruct`` of all the particles; every image gets that one map (volume scores only)."""
    run_dir = out / "reconstruct"
    t0 = cpu_s()
    run_method(get_method("reconstruct"), {"particles": str(ds / "particles.star"), "threads": threads,
                                           "overwrite": True}, run_dir)
    seconds = cpu_s() - t0
    return score_one_map(ds, run_dir / "map.mrc", label="reconstruct (one map)", n_images=n_images,
                         **SCORE_KW)["summary"], seconds


# ------------------------------------------------------------------------------------------------- peers

def run_cryodrgn(exe: str, ds: Path, out: Path, epochs: int, threads: int, n_images: int, width: int,
                 seed: int = -1) -> tuple[dict[str, Any], float]:
    """cryoDRGN ``train_vae`` (zdim 8, 3 layers of ``width`` in encoder and decoder; ``seed`` -1: the random one
    it draws), scored on its latents and, with ``n_images``, on its ``eval_vol`` maps at those images' latents in
    both hands (the better kept)."""
    out.mkdir(parents=True, exist_ok=True)
    env, star = thread_env(threads), str(ds / "particles.star")
    pose, ctf = out / "pose.pkl", out / "ctf.pkl"
    train = out / "train_vae"

    def train_vae() -> None:
        run_logged([exe, "parse_pose_star", star, "-o", str(pose)], out / "parse_pose.log", env)
        run_logged([exe, "parse_ctf_star", star, "--ps", "0", "-o", str(ctf)], out / "parse_ctf.log", env)
        run_logged([exe, "train_vae", star, "--poses", str(pose), "--ctf", str(ctf), "--zdim", "8", "-n",
                    str(epochs), "--enc-dim", str(width), "--dec-dim", str(width), "--max-threads", str(threads),
                    "--no-analysis", *(["--seed", str(seed)] if seed >= 0 else []), "-o", str(train)],
                   out / "train_vae.log", env)

    seconds = timed_once(out / "train_vae.cpu_s", train_vae)
    if not n_images:                        # latents only (eval_vol takes minutes per 64³ map on a shared CPU core)
        return score_cryodrgn(train / "z.pkl", ds, **SCORE_KW)["summary"], seconds
    os.environ["PATH"] = str(Path(exe).parent) + os.pathsep + os.environ["PATH"]
    scores = {flip: score_cryodrgn(train / "z.pkl", ds, weights=train / "weights.pkl", config=train / "config.yaml",
                                   flip=flip, n_images=n_images, **SCORE_KW)["summary"] for flip in (False, True)}
    best = max(scores, key=lambda f: scores[f]["per_image_fsc_auc"])
    return dict(scores[best], flip=best, per_image_fsc_auc_other_hand=scores[not best]["per_image_fsc_auc"]), seconds


def timed_once(stamp: Path, fn: Callable[[], object]) -> float:
    """CPU seconds of ``fn()``, kept in ``stamp``; a stamp left by a finished earlier call is read instead."""
    if stamp.is_file():
        return float(stamp.read_text())
    t0 = cpu_s()
    fn()
    seconds = cpu_s() - t0
    stamp.write_text(f"{seconds:.1f}\n")
    return seconds


def run_recovar(python: str, ds: Path, out: Path, threads: int, n_images: int, zdim: int = 4
                ) -> tuple[dict[str, Any], float]:
    """RECOVAR's pipeline, then its kernel-regression maps (``compute_state``) at the latents of ``n_images``
    evenly spaced images (fewer than CryoBench's 100 on a CPU: each map is a local-resolution kernel estimate;
    0: its latents only)."""
    out.mkdir(parents=True, exist_ok=True)
    env = thread_env(threads)
    exe = recovar_cpu.command(python)
    pipeline = out / "pipeline"
    seconds = timed_once(out / "pipeline.cpu_s", lambda: run_logged(
        [*exe, "pipeline", str(ds / "particles.star"), "--mask", "sphere", "--zdim", str(zdim), "--accept-cpu",
         "-o", str(pipeline)], out / "pipeline.log", env))
    z = recovar_cpu.latents(pipeline, zdim)
    if not n_images:
        return score_arrays(z, ds, volumes_dir=None, label="RECOVAR 1.0.5 (latents only)", **SCORE_KW)["summary"], \
            seconds
    dset = load_dataset(ds)
    idx = image_indices(dset.n_particles, n_images)
    points = out / "latent_points.txt"
    np.savetxt(points, z[idx])
    states = out / "states"
    t1 = cpu_s()
    run_logged([*exe, "compute_state", str(pipeline), "--latent-points", str(points), "-o", str(states)],
               out / "compute_state.log", env)
    seconds += cpu_s() - t1
    maps = recovar_cpu.state_maps(states, len(idx))
    labels = np.zeros(dset.n_particles, np.int64)
    labels[idx] = np.arange(len(idx))
    res = score_arrays(z, ds, volumes_dir=None, label="RECOVAR 1.0.5", **SCORE_KW)["summary"]
    pv = ParticleVolumes.from_labels(maps, labels, describe="RECOVAR compute_state maps")
    vol = score(ds, None, pv, label="RECOVAR 1.0.5", n_images=n_images, **SCORE_KW)["summary"]
    res.update({k: v for k, v in vol.items() if k not in res}, n_images=len(idx))
    return res, seconds


def run_job(method: str, a: argparse.Namespace, ds: Path, out: Path) -> tuple[dict[str, Any], float]:
    """Run one leaderboard entry on dataset ``ds``; (score summary, CPU seconds of the run, scoring excluded)."""
    if method == "reconstruct":
        return homogeneous(ds, out, a.threads, a.n_images)
    if method == "cryodrgn":
        return run_cryodrgn(a.cryodrgn, ds, out / "cryodrgn", a.epochs, a.threads,
                            a.n_images if a.cryodrgn_maps else 0, a.width, a.seed)
    if method == "recovar":
        return run_recovar(a.recovar, ds, out / "recovar", a.threads, a.recovar_images)
    run_dir = out / method                  # a finished run is scored again, not rerun
    cryohet = get_method(method.split("@")[0])
    seed = {"seed": a.seed} if a.seed >= 0 and any(p.name == "seed" for p in cryohet.all_params()) else {}
    seconds = timed_once(out / f"{method}.cpu_s", lambda: run_method(
        cryohet, {**cryohet_params(method, a, ds, out), **seed, "threads": a.threads, "overwrite": True}, run_dir))
    summary = score_run(run_dir, ds, n_images=a.n_images, **SCORE_KW)["summary"]
    if "per_image_fsc_auc" in summary:
        summary[MEAN_LATENT] = mean_latent_score(run_dir, ds, a.n_images)
    return summary, seconds


def mean_latent_score(run_dir: Path, ds: Path, n_images: int) -> float:
    """Per-image FSC AUC of one map, the run's map at its particles' mean latent, given to every image: set
    beside the run's own score, it tells what its latents add from what its kind of map gains over
    ``reconstruct``'s (e.g. a mixture of Gaussians has no noise in the solvent)."""
    z = run_latents(run_dir)
    vol = run_volume_model(run_dir).volumes(z.mean(0, keepdims=True).astype(np.float32))[0]
    return score_one_map(ds, vol, label="map at the mean latent", n_images=n_images,
                         **SCORE_KW)["summary"]["per_image_fsc_auc"]


# ------------------------------------------------------------------------------------------------- table

def row(name: str, method: str, s: dict[str, Any], seconds: float | None, peer: dict[str, Any] | None = None,
        columns: tuple[str, ...] = COLUMNS) -> str:
    """A table row; with ``peer`` (cryoDRGN's record on the set) the per-image FSC AUC and CPU-time ratios."""
    cells = [f"{s[c]:.3f}" if isinstance(s.get(c), float) else "–" for c in columns]
    cells.append("–" if seconds is None else f"{seconds:.0f}")
    ratio = "–"
    if peer and peer.get("seconds") and seconds and "per_image_fsc_auc" in s and "per_image_fsc_auc" in peer["summary"]:
        ratio = (f"{s['per_image_fsc_auc'] / peer['summary']['per_image_fsc_auc']:.2f} / "
                 f"{seconds / peer['seconds']:.2f}")
    return f"| {name} | {method} | " + " | ".join(cells) + f" | {ratio} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/peers/cryobench"))
    ap.add_argument("--out", type=Path, default=Path("/work/peers/cryobench/lb"))
    ap.add_argument("--sets", nargs="+", default=list(CRYOBENCH), choices=list(CRYOBENCH))
    ap.add_argument("--size", default="cpu", choices=list(SIZES))
    ap.add_argument("--n", type=int, default=0, help="particles per set (0: the size preset's)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the trained methods and of cryoDRGN")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--snr", type=float, default=0.0,
                    help="SNR of the sets instead of the size preset's (sets in <data>/<set>-snr<snr>)")
    ap.add_argument("--top_views", type=float, default=0.0,
                    help="fraction of the particles near the top view (preferred orientations; sets in "
                         "<data>/<set>[-snr<snr>]-top<fraction>)")
    ap.add_argument("--width", type=int, default=256,
                    help="hidden-layer width of the encoder and decoder of train-vae and of cryoDRGN (both 3 layers)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--vae", default="{}", help='further train-vae parameters, JSON (e.g. \'{"anchor": '
                    '"homogeneous", "beta": 1}\'); the runs are cached under the method\'s name')
    ap.add_argument("--seed", type=int, default=-1,
                    help="random seed of every trained method and of cryoDRGN (-1: each program's default; "
                         "cryoDRGN then draws one)")
    ap.add_argument("--cryodrgn", default="/work/peers/cryodrgn-venv/bin/cryodrgn")
    ap.add_argument("--recovar", default="/work/peers/recovar-venv/bin/python",
                    help="the Python of RECOVAR 1.0.5's environment (it runs bench/recovar_cpu.py)")
    ap.add_argument("--n_images", type=int, default=100, help="images of the per-image FSC (CryoBench: 100)")
    ap.add_argument("--recovar_images", type=int, default=100,
                    help="images whose RECOVAR maps are scored (0: its latents only; on a CPU each compute_state map "
                         "takes minutes at box 128)")
    ap.add_argument("--no_cryodrgn_maps", dest="cryodrgn_maps", action="store_false",
                    help="score cryoDRGN's latents only (no eval_vol)")
    ap.add_argument("--mean_latent", action="store_true",
                    help="add the column 'map at the mean latent': the per-image FSC AUC of one map, the run's at its "
                         "particles' mean latent, given to every image (cryohet methods with a volume model)")
    ap.add_argument("--table_only", action="store_true", help="only tabulate the runs already scored (no new runs)")
    a = ap.parse_args()
    lines: list[str] = []
    cols = COLUMNS + ((MEAN_LATENT,) if a.mean_latent else ())
    for name in a.sets:
        ds = ensure_dataset(a.data, name, a.size, a.n, a.snr, a.top_views)
        name = ds.name
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        kw = dict(n_images=a.n_images, **SCORE_KW)
        lines.append(row(name, "truth (ceiling)", score_true_answer(ds, **kw)["summary"], None, columns=cols))
        lines.append(row(name, "shuffled truth (chance)", score_true_answer(ds, shuffle=True, **kw)["summary"], None,
                         columns=cols))
        null = neighbourhood_null(truth_embedding(load_dataset(ds)))
        cells = ["–"] * len(cols)
        cells[cols.index("neighbourhood_similarity")] = f"{null['lo']:.3f}-{null['hi']:.3f}"
        lines.append(f"| {name} | latents without information (95 % of {null['draws']} draws) | "
                     + " | ".join(cells) + " | – | – |")
        records: dict[str, dict[str, Any]] = {}
        for m in ["reconstruct"] + a.methods:
            cache = out / f"{m}.score.json"
            if cache.is_file():
                records[m] = json.loads(cache.read_text())
                continue
            if a.table_only:
                continue
            try:
                s, secs = run_job(m, a, ds, out)
                records[m] = {"summary": s, "seconds": secs}
                cache.write_text(json.dumps(records[m], indent=1, default=float))
            except Exception as exc:  # noqa: BLE001  (a failed peer is a row of the table, not the end)
                records[m] = {"summary": {}, "seconds": None, "error": f"{type(exc).__name__}: {exc}"}
            print(m, json.dumps(records[m], default=float)[:400], flush=True)
        peer = records.get("cryodrgn") if not records.get("cryodrgn", {}).get("error") else None
        for m, rec in records.items():
            label = LABELS.get(m, m) + (f" (failed: {rec['error'][:100]})" if rec.get("error") else "")
            lines.append(row(name, label, rec["summary"], rec["seconds"], peer, cols))
    extra = " map at the mean latent: per-image FSC AUC |" if a.mean_latent else ""
    head = ("| set | method | per-image FSC AUC | per-state FSC AUC | neighbourhood similarity | II latent→truth | "
            f"II truth→latent |{extra} CPU (s) | vs cryoDRGN: FSC AUC / time |\n" + "|---" * (len(cols) + 4) + "|")
    table = head + "\n" + "\n".join(lines)
    (a.out / "leaderboard.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
