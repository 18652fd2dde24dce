"""Ab initio poses side by side: `cryohet abinit`, cryoDRGN 4.3.1's `cryodrgn abinit`, RELION 3.1.3's auto-refine.

    .venv/bin/python bench/bench_abinit.py --out /tmp/bench_abinit --skip_cryodrgn   # 2000 images, box 64, SNR 0.1
    .venv/bin/python bench/bench_abinit.py --out /tmp/bench_abinit --skip_cryodrgn --snr 0.1 1.0   # two SNRs
    .venv/bin/python bench/bench_abinit.py --out /tmp/bench_abinit_small --n 300 --box 32 --snr 1   # with cryoDRGN

Data (one folder per SNR, made once and reused): ``cryohet.simulate`` of the bundled adenylate kinase, one
conformation, ``--n`` particles of ``--box`` px over a 128 Å field of view (2 Å/px at box 64), CTF (defocus
1-2.5 µm), origins of σ 2 Å, uniformly random orientations, noise at signal variance / noise variance ``--snr`` inside
the particle. The simulator's ``particles.star`` holds the true poses; every program reads
``particles_noposes.star``, the same table without the angle and origin columns (and without the simulator's truth
columns): CTF, optics group, image names and the random half-sets.

Rows, per SNR:

* ``cryohet abinit`` (ab initio): ``cryohet.runner.run_method`` of ``cryohet.methods.abinit`` with its defaults
  (``--particle_diameter_A`` 100 as RELION's), no reference: a truly ab initio run.
* ``cryohet abinit --reference``: the same with RELION's starting map (below), for a like-for-like comparison with
  RELION.
* cryoDRGN 4.3.1 ``cryodrgn abinit --zdim 0`` (homogeneous cryoDRGN-AI), from its own virtual environment
  (``--cryodrgn``), CTF from its ``parse_ctf_star --ps 0``, its defaults except ``-n`` (``--cryodrgn_epochs``,
  default 3: its pretraining pass and then the 3 hierarchical-pose-search epochs of its default schedule, no SGD
  epochs), ``--max-threads``, ``--seed`` and ``--no-analysis``. On two CPU cores one pose-search epoch of 300
  images of 32 px took 13-27 min, so at the default size (2000 images of 64 px) its 3 epochs would take many hours:
  run the default size with ``--skip_cryodrgn`` (or on a GPU). Its poses are the last ``pose.<epoch>.pkl`` (read
  with cryohet's numpy-only unpickler): rotation matrices that are RELION's matrix A itself and translations in
  pixels equal to RELION's origins (rlnOriginX/YAngst / pixel size). Both are checked on every run with cryoDRGN's
  own code (``convention_check`` in results.json): its ``utils.R_from_relion`` (what ``parse_pose_star`` stores,
  and its models rotate lattice coordinates as ``coords @ R``) equals ``cryohet.geometry.euler.euler_to_matrix``, and
  its ``Lattice.translate_ht`` by +origin (the shift its model applies to the image) centres images made with that
  RELION origin (``parse_pose_star`` stores origin / box instead, the fraction ``train_vae`` multiplies back).
  The scores under the other conventions (Aᵀ, -origin, fraction of the box) are written to results.json too.
* RELION 3.1.3 auto-refine: ``mpirun -n 3 relion_refine_mpi --j 1 --auto_refine --split_random_halves`` (RELION
  refuses ``--split_random_halves`` without MPI; a leader and two followers on the two cores) with ``--ref
  initial.mrc --firstiter_cc --ini_high 30``, where ``initial.mrc`` is the TRUE map low-passed to 30 Å: RELION gets a
  head start no ab initio program has. Other options: ``--ctf --particle_diameter 100 --flatten_solvent --zero_mask
  --oversampling 1 --healpix_order 2 --auto_local_healpix_order 3 --offset_range 5 --offset_step 2 --sym C1
  --low_resol_join_halves 40 --norm --scale --pad 2 --pool 30 --dont_combine_weights_via_disc`` (local searches from
  healpix order 3 instead of RELION's default 4: on two cores its global searches at 7.5° took 12 min an iteration
  for 300 images of 32 px, and would take hours at the default size). Poses: the final
  ``run_data.star``, matrices ``euler_to_matrix(rlnAngleRot/Tilt/Psi)``, origins ``rlnOriginX/YAngst``.

Scores (``cryohet.validation.poses.pose_errors``, the same code for all): per particle the angle between the
estimated and true orientation and the distance between the estimated and true origin (Å) after the best global
rotation, translation and hand (an ab initio map is known only up to those); medians, and the fraction of particles
within 10°. Also each program's own half-map FSC 0.143 resolution (cryohet: its run record / fsc.star; RELION: the
final "Final resolution (without masking)" of its log, else ``rlnCurrentResolution`` of ``run_model.star``;
cryoDRGN has no half-maps), and the whole command's wall and CPU (user + system) seconds and peak resident memory
of its largest process (``os.wait4``, ``bench/command_cost.py``). Writes ``results.json`` in ``--out`` and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from command_cost import Cost, timed  # noqa: E402  (beside this script)

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
DIAMETER_A = 100.0  # RELION --particle_diameter (and ours): the molecule is about 70 Å long, the field 128 Å
INI_HIGH_A = 30.0   # low-pass of the starting map (RELION --ini_high, our --ini_high_A default)
FOV_A = 128.0       # field of view of the simulated images
WITHIN_DEG = 10.0
NOPOSE_STAR = "particles_noposes.star"
INITIAL_MAP = "initial.mrc"
HIDDEN = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
          "rlnOriginYAngst")
#: RELION's --auto_local_healpix_order: local searches from 7.5° on (its default 4 keeps global searches at 7.5°,
#: 12 min an iteration for 300 images of 32 px on two cores, hours at the default size)
RELION_LOCAL_ORDER = 3
MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi"]

#: our method in a child process (as bench_vae.py runs train_vae): values as JSON, output folder
_OURS = textwrap.dedent("""
    import json, sys
    from cryohet.runner import run_method
    from cryohet.methods.abinit import METHOD
    run_method(METHOD, {"overwrite": True, **json.loads(sys.argv[1])}, sys.argv[2])
""")

#: conventions check, in cryoDRGN's venv: its rotation of Euler angles (parse_pose_star's ``R_from_relion``) and its
#: ``Lattice.translate_ht`` of projections made with known RELION origins (pixels) by +origin and by -origin,
#: against the same projections made without origin (relative squared error of the Hartley transforms)
_DRGN_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from cryodrgn import fft, utils
    from cryodrgn.lattice import Lattice
    from cryodrgn.source import ImageSource
    work = sys.argv[1]
    np.save(work + "/rot_check.npy", utils.R_from_relion(np.load(work + "/euler_check.npy")))
    imgs = ImageSource.from_file(work + "/shift_check.mrcs").images()
    m, n = len(imgs) // 2, imgs.shape[-1]
    ht = fft.symmetrize_ht(torch.stack([fft.ht2_center(i) for i in imgs])).reshape(2 * m, -1)
    origin = torch.tensor(np.load(work + "/origin_check_px.npy"), dtype=torch.float32)
    lattice = Lattice(n + 1, extent=0.5)
    out = {}
    for name, t in (("plus", origin), ("minus", -origin)):
        y = lattice.translate_ht(ht[:m], t[:, None, :])[:, 0]
        out[name] = float((((y - ht[m:]) ** 2).sum(1) / (ht[m:] ** 2).sum(1)).max())
    print(json.dumps(out))
""")


# --------------------------------------------------------------------------------------------------- data

def make_data(d: Path, n: int, box: int, snr: float, seed: int) -> None:
    """Simulate the particles (true poses in particles.star / ground_truth.npz), the pose-free STAR and the
    starting map (the true map low-passed to INI_HIGH_A)."""
    import torch

    from cryohet.io.mrc import read_map, write_map
    from cryohet.io.star import read_star, write_star
    from cryohet.simulate.density import lowpass_map
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import discrete_conformations
    from cryohet.simulate.simulate import simulate_particles

    apix = FOV_A / box
    conf = discrete_conformations([default_molecule()], apix=apix, box=box, resolution_A=max(6.0, 2.5 * apix))
    simulate_particles(conf, d, n, snr, seed=seed, image_paths="star")
    blocks = read_star(d / "particles.star")
    parts = blocks["particles"]
    keep = [c for c in parts.columns if c not in HIDDEN and not c.startswith("cryohet")]
    write_star(d / NOPOSE_STAR, {"optics": blocks["optics"], "particles": parts[keep]})
    vol, _ = read_map(d / "maps" / "state_000.mrc")
    low = lowpass_map(torch.as_tensor(vol, dtype=torch.float32), apix, INI_HIGH_A).numpy()
    write_map(d / INITIAL_MAP, low, apix)
    (d / "bench.json").write_text(json.dumps({"n": n, "box": box, "apix": apix, "snr": snr, "seed": seed}))


def truth(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """True RELION matrices (N, 3, 3) and origins (N, 2) Å, in STAR row order."""
    from cryohet.geometry.euler import euler_to_matrix

    with np.load(d / "ground_truth.npz") as gt:
        return euler_to_matrix(gt["euler_deg"]), np.asarray(gt["shift_A"], dtype=np.float64)


def image_order(d: Path, star: Path) -> np.ndarray:
    """Row of ``star`` holding each particle of the input STAR (matched by image number and stack file name)."""
    from cryohet.io.star import read_star

    def key(name: str) -> tuple[int, str]:  # programs may rewrite the stack's path (cryohet: absolute)
        index, stack = name.split("@", 1)
        return int(index), Path(stack).name

    names = read_star(star)["particles"]["rlnImageName"]
    where = {key(name): i for i, name in enumerate(names)}
    return np.array([where[key(name)] for name in read_star(d / NOPOSE_STAR)["particles"]["rlnImageName"]])


def star_poses(d: Path, star: Path) -> tuple[np.ndarray, np.ndarray]:
    """RELION matrices and origins (Å) of a particles STAR, rows in the input STAR's order."""
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.io.star import read_star

    p = read_star(star)["particles"].iloc[image_order(d, star)]
    A = euler_to_matrix(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64))
    return A, p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------------- ours

def run_ours(d: Path, out: Path, reference: bool, threads: int, seed: int) -> Cost:
    values: dict[str, Any] = dict(particles=str(d / NOPOSE_STAR), particle_diameter_A=DIAMETER_A, threads=threads,
                                  seed=seed)
    if reference:
        values["reference"] = str(d / INITIAL_MAP)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return timed([sys.executable, "-c", _OURS, json.dumps(values), str(out)], REPO, out.with_suffix(".log"))


def ours_result(d: Path, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    from cryohet.record import read_record

    A, s = star_poses(d, out / "particles.star")
    res = read_record(out).require("fsc", out, "FSC").meta.get("resolution_A", float("nan"))
    return A, s, float(res)


# --------------------------------------------------------------------------------------------------- cryoDRGN

def check_drgn_conventions(exe: str, d: Path, work: Path) -> dict[str, float]:
    """Check the conventions assumed for cryoDRGN's poses with its own code: the largest difference between its
    matrices of the true Euler angles and ``euler_to_matrix`` (0: its matrices are RELION's A), and the largest
    relative error of its ``translate_ht`` by +origin and by -origin of images made with RELION origins (0 for
    the sign that centres them)."""
    import mrcfile
    import torch

    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.geometry.project import Projector
    from cryohet.io.mrc import read_map

    with np.load(d / "ground_truth.npz") as gt:
        e = np.asarray(gt["euler_deg"][:16], dtype=np.float64)
    np.save(work / "euler_check.npy", e)
    vol, _ = read_map(d / "maps" / "state_000.mrc")
    A = torch.as_tensor(euler_to_matrix(e), dtype=torch.float32)
    origin = torch.as_tensor(np.random.default_rng(0).uniform(-3, 3, (len(e), 2)), dtype=torch.float32)
    proj = Projector(torch.as_tensor(vol, dtype=torch.float32))
    with mrcfile.new(work / "shift_check.mrcs", overwrite=True) as m:
        m.set_data(torch.cat([proj.project(A, origin), proj.project(A)]).numpy().astype(np.float32))
    np.save(work / "origin_check_px.npy", origin.numpy())
    python = str(Path(exe).parent / "python")
    timed([python, "-c", _DRGN_CHECK, str(work)], work, work / "convention_check.log")
    shifts = json.loads((work / "convention_check.log").read_text().strip().splitlines()[-1])
    rot = float(np.abs(np.load(work / "rot_check.npy") - euler_to_matrix(e)).max())
    return {"R_from_relion_minus_A": rot, "translate_ht_plus_origin_error": shifts["plus"],
            "translate_ht_minus_origin_error": shifts["minus"]}


def run_cryodrgn(exe: str, d: Path, out: Path, epochs: int, threads: int, seed: int,
                 options: tuple[str, ...] = ("--zdim", "0")) -> Cost:
    """``cryodrgn parse_ctf_star`` then ``cryodrgn abinit`` with ``options`` (bench_abinit_het.py: --zdim 1)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctf = out / "ctf.pkl"
    # our STAR has no rlnPhaseShift column: without --ps cryoDRGN stores NaN and its CTF is NaN
    cost = timed([exe, "parse_ctf_star", str(d / NOPOSE_STAR), "--ps", "0", "-o", str(ctf)], out,
                 out / "parse_ctf.log")
    cost += timed([exe, "abinit", str(d / NOPOSE_STAR), "--ctf", str(ctf), *options, "-n", str(epochs),
                   "--datadir", str(d), "--max-threads", str(threads), "--seed", str(seed), "--no-analysis",
                   "-o", str(out / "run")], out, out / "abinit.log")
    return cost


def last_pose_pkl(run: Path) -> Path:
    found = sorted(run.glob("pose.*.pkl"), key=lambda p: int(p.name.split(".")[1]))
    if not found:
        raise SystemExit(f"no pose.<epoch>.pkl in {run}")
    return found[-1]


def cryodrgn_conventions(pkl: Path, box: int, apix: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cryoDRGN's poses as RELION matrices and origins (Å) under each candidate convention; the first is the
    one used (see the module docstring)."""
    from cryohet.validation.external import load_numpy_pickle

    obj = load_numpy_pickle(pkl)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise SystemExit(f"{pkl}: expected (rotations, translations)")
    R, t = (np.asarray(x, dtype=np.float64) for x in obj)
    Rt = np.swapaxes(R, -1, -2)
    return {"A = R, origin = +t px": (R, t * apix), "A = R, origin = -t px": (R, -t * apix),
            "A = R, origin = +t box": (R, t * box * apix), "A = R, origin = -t box": (R, -t * box * apix),
            "A = Rᵀ, origin = +t px": (Rt, t * apix), "A = Rᵀ, origin = -t px": (Rt, -t * apix)}


# --------------------------------------------------------------------------------------------------- RELION

def run_relion(d: Path, seed: int) -> Cost:
    r = d / "relion"
    shutil.rmtree(r, ignore_errors=True)
    r.mkdir()
    cmd = [*MPI, "--i", NOPOSE_STAR, "--o", "relion/run", "--ref", INITIAL_MAP, "--firstiter_cc", "--ini_high",
           f"{INI_HIGH_A:g}", "--auto_refine", "--split_random_halves", "--ctf", "--particle_diameter",
           f"{DIAMETER_A:g}", "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
           "--auto_local_healpix_order", str(RELION_LOCAL_ORDER), "--offset_range", "5", "--offset_step", "2",
           "--sym", "C1", "--low_resol_join_halves", "40", "--norm", "--scale", "--pad", "2", "--pool", "30",
           "--dont_combine_weights_via_disc", "--random_seed", str(seed), "--j", "1"]
    return timed(cmd, d, r / "refine.log")


def relion_resolution(d: Path) -> float:
    log = (d / "relion" / "refine.log").read_text(errors="replace")
    found = re.findall(r"Final resolution \(without masking\) is:\s*([\d.]+)", log)
    if found:
        return float(found[-1])
    from cryohet.io.star import read_star

    model = d / "relion" / "run_model.star"
    if model.exists():
        return float(read_star(model)["model_general"]["rlnCurrentResolution"].iloc[0])
    return float("nan")


# --------------------------------------------------------------------------------------------------- scores

def score(A: np.ndarray, s: np.ndarray, A_true: np.ndarray, s_true: np.ndarray) -> dict[str, Any]:
    from cryohet.validation.poses import pose_errors

    e = pose_errors(A, s, A_true, s_true)
    return {"median_angle_deg": e.median_angle_deg, "median_shift_A": e.median_shift_A,
            "within_10deg": float(np.mean(e.angle_deg <= WITHIN_DEG)), "mirrored": e.mirrored,
            "mean_angle_deg": float(e.angle_deg.mean()), "global_rotation": e.rotation.tolist(),
            "global_translation_A": e.translation_A.tolist()}


def cost_dict(c: Cost) -> dict[str, float]:
    return {"wall_s": c.wall_s, "cpu_s": c.cpu_s, "peak_rss_MB": c.peak_gb * 1024}


def run_or_reuse(folder: Path, reuse: bool, run: Any) -> Cost:
    """The cost of ``run()`` (which writes ``folder``), or with ``reuse`` of an earlier finished run."""
    timing = folder / "timing.json"
    if reuse and timing.exists():
        return Cost(**json.loads(timing.read_text()))
    cost = run()
    folder.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps(asdict(cost)))
    return cost


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if x is not None and np.isfinite(x) else "–"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| SNR | program | start | median angle error (°) | within 10° (%) | median origin error (Å) | hand "
             "| own half-map FSC 0.143 (Å) | wall (s) | CPU (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['snr']:g} | {r['program']} | {r['start']} | failed: {r['error'][:80]} "
                         "| | | | | | | |")
            continue
        s, c = r["score"], r["cost"]
        lines.append(f"| {r['snr']:g} | {r['program']} | {r['start']} | {fmt(s['median_angle_deg'])} "
                     f"| {fmt(100 * s['within_10deg'], 0)} | {fmt(s['median_shift_A'], 2)} "
                     f"| {'mirrored' if s['mirrored'] else 'same'} | {fmt(r['resolution_A'])} "
                     f"| {c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['peak_rss_MB']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main

def bench_snr(a: argparse.Namespace, snr: float, results: dict[str, Any], save: Any) -> None:
    d = a.out / f"n{a.n}_box{a.box}_snr{snr:g}_seed{a.seed}"
    if not (d / INITIAL_MAP).exists():
        print(f"simulating {a.n} particles, box {a.box}, SNR {snr:g} into {d}", flush=True)
        make_data(d, a.n, a.box, snr, a.seed)
    A_true, s_true = truth(d)
    apix = FOV_A / a.box
    rows: list[dict[str, Any]] = results["rows"]

    def record(program: str, start: str, fn: Any) -> None:
        row: dict[str, Any] = {"snr": snr, "program": program, "start": start}
        try:
            row.update(fn())
        except (SystemExit, OSError, RuntimeError, ValueError) as exc:
            row["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"{program} failed: {exc}", flush=True)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        save()

    for ref, name in ((False, "cryohet_abinit"), (True, "cryohet_abinit_ref")):
        if a.skip_ours:
            break
        out = d / name

        def ours(out: Path = out, ref: bool = ref) -> dict[str, Any]:
            cost = run_or_reuse(out, a.reuse, lambda: run_ours(d, out, ref, a.threads, a.seed))
            A, s, res = ours_result(d, out)
            return {"score": score(A, s, A_true, s_true), "resolution_A": res, "cost": cost_dict(cost),
                    "folder": str(out)}

        record("cryohet `abinit`" + (" --reference" if ref else ""),
               "true map low-passed to 30 Å" if ref else "ab initio", ours)

    if not a.skip_cryodrgn:
        def drgn() -> dict[str, Any]:
            work = d / "cryodrgn"
            cost = run_or_reuse(work, a.reuse, lambda: run_cryodrgn(a.cryodrgn, d, work, a.cryodrgn_epochs,
                                                                     a.threads, a.seed))
            pkl = last_pose_pkl(work / "run")
            conv = {k: score(A, s, A_true, s_true) for k, (A, s) in cryodrgn_conventions(pkl, a.box, apix).items()}
            used = next(iter(conv))
            best_rot = min(conv, key=lambda k: conv[k]["median_angle_deg"])
            best_shift = min(conv, key=lambda k: conv[k]["median_shift_A"])
            # only poses that fit the truth under some convention can tell the conventions apart
            if conv[best_rot]["median_angle_deg"] < min(WITHIN_DEG, conv[used]["median_angle_deg"] - 2.0) or \
                    (conv[used]["median_angle_deg"] < WITHIN_DEG
                     and conv[best_shift]["median_shift_A"] < conv[used]["median_shift_A"] - 0.5):
                print(f"warning: cryoDRGN's poses fit the truth better as {best_rot!r} (rotation) / {best_shift!r} "
                      f"(origin) than as {used!r}", flush=True)
            check = check_drgn_conventions(a.cryodrgn, d, work)
            if check["R_from_relion_minus_A"] > 1e-6 or check["translate_ht_plus_origin_error"] > 1e-3:
                print(f"warning: cryoDRGN's conventions are not those assumed here: {check}", flush=True)
            return {"score": conv[used], "resolution_A": float("nan"), "cost": cost_dict(cost), "folder": str(work),
                    "pose_file": str(pkl), "epochs": a.cryodrgn_epochs, "convention": used,
                    "conventions": {k: {"median_angle_deg": v["median_angle_deg"],
                                        "median_shift_A": v["median_shift_A"]} for k, v in conv.items()},
                    "convention_check": check}

        record("cryoDRGN 4.3.1 `abinit --zdim 0`", f"ab initio, {a.cryodrgn_epochs} epochs", drgn)

    if not a.skip_relion:
        def relion() -> dict[str, Any]:
            cost = run_or_reuse(d / "relion", a.reuse, lambda: run_relion(d, a.seed))
            A, s = star_poses(d, d / "relion" / "run_data.star")
            return {"score": score(A, s, A_true, s_true), "resolution_A": relion_resolution(d),
                    "cost": cost_dict(cost), "folder": str(d / "relion")}

        record("RELION 3.1.3 auto-refine", "true map low-passed to 30 Å", relion)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_abinit"))
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--box", type=int, default=64, help="box in pixels (field of view 128 Å)")
    ap.add_argument("--snr", type=float, nargs="+", default=[0.1],
                    help="signal variance over noise variance in the particle; one data set each")
    ap.add_argument("--threads", type=int, default=2, help="threads of cryohet and cryoDRGN (RELION: 3 MPI × 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cryodrgn", default="/work/cryodrgn-venv/bin/cryodrgn")
    ap.add_argument("--cryodrgn_epochs", type=int, default=3,
                    help="cryodrgn abinit -n (its pose search takes the first 3 epochs after pretraining)")
    ap.add_argument("--skip_ours", action="store_true")
    ap.add_argument("--skip_cryodrgn", action="store_true")
    ap.add_argument("--skip_relion", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="score earlier finished runs in the same folders")
    a = ap.parse_args()
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                               "rows": []}

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(results, indent=1, default=float))

    for snr in a.snr:
        bench_snr(a, snr, results, save)
    text = (f"\n{a.n} particles, box {a.box} ({FOV_A / a.box:g} Å/px), particle diameter {DIAMETER_A:g} Å; "
            + ("" if a.skip_cryodrgn else f"cryoDRGN: {a.cryodrgn_epochs} epochs after pretraining; ")
            + f"RELION starts from the true map low-passed to {INI_HIGH_A:g} Å\n\n" + table(results["rows"]))
    results["table"] = text
    save()
    (a.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
