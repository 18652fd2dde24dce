"""GPU check: speed of cryohet side by side with cryoDRGN 4.3.1 on one GPU, within a time budget.

    python bench/gpu_check.py                    # on the GPU machine (bench/gpu_check.sh runs it after the tests)
    python bench/gpu_check.py --cpu-smoke        # the whole pipeline, tiny, on the CPU (box 32, 200 particles)

For each box (default 128 and 256): ``cryohet simulate`` makes a hinge dataset (the bundled molecule, CTF,
SNR 0.1, a 192 Å field of view); ``cryohet reconstruct``, ``cryohet train-vae``, ``cryohet principal-volumes``,
``cryohet classify`` and ``cryohet abinit`` (poses hidden) run on it, and cryoDRGN's ``train_vae`` on the same
STAR with the same architecture (3 × 1024 encoder and decoder, z 8), batch size, learning rate and number of
epochs, each program with its own default mixed precision. train-vae is compared by the time of its last epoch
as each program logs it (start-up, data loading and the final latent pass excluded); the other steps by the wall
time of the method. Then, per box, ``cryohet.simulate.bodies.simulate_two_bodies`` makes two-body data (the LID
hinge, at most 1000 particles, SNR 2) and ``cryohet multibody`` refines it for 2 iterations at Nyquist. Last, per
box, the atomic-model methods: ``cryohet nma`` of the molecule's heavy atoms (the torch solver by default) and of
its Cα, particles moved along its modes 1-3 (at most 2000), ``cryohet fit-modes`` direct and amortised and
``cryohet train-atomic`` on them, and ``cryohet reweight`` on particles drawn from 10 frames of a trajectory.

Peak GPU memory is ``torch.cuda.max_memory_allocated`` in the process that ran the step (reset before it), for
cryohet and for cryoDRGN alike. cryohet's steps run in one child process per box (``run_method``, as the CLI
runs them), cryoDRGN in its own child process through its command modules (its console script imports every
command, some needing GUI packages), its phase-shift NaN (STAR files without rlnPhaseShift) set to 0. Child
processes are killed at the deadline (``--budget_s``), so a slow step costs its own row only; steps not run say
so in the table. cryoDRGN's column shows '-' when ``import cryodrgn`` fails.

Writes ``<work>/results.jsonl`` (one line per step) and prints a Markdown table for docs/benchmarks.md, also
written to ``$OUT/gpu_check.md`` (and ``gpu_check.json``) when OUT is set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIELD_A = 192.0  # field of view of the simulated images, Å (box × apix)
#: Steps that make the data of the steps after them (a failed one ends its group).
DATA_STEPS = ("simulate", "two-bodies", "mode-data", "ensemble-data")
RESERVE_S = 20.0  # time kept for each later job of the check when one runs long
#: train-vae again on the first box's data without the prepared-image cache and/or the background reader (#17
#: items 4 and 1): (step name's tail, train-vae's values); the plain train-vae row has the cache (auto) and reader on
LOADER_VARIANTS = (("cache off", {"cache": "off"}), ("reader off", {"prefetch": 0}),
                   ("cache off, reader off", {"cache": "off", "prefetch": 0}))


# --------------------------------------------------------------------------------------------------- children

def _cuda_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def _emit(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print("gpu_check:", json.dumps(row), flush=True)


def child_ours(spec: dict[str, Any]) -> None:
    """Run cryohet's steps for one box in this process, one result line per step."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
    from cryohet.methods import all_methods
    from cryohet.runner import run_method

    methods = all_methods()
    res, deadline = Path(spec["results"]), spec["deadline"]
    import torch

    if spec["device"] != "cpu" and torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, outside the first step's time
    common = dict(device=spec["device"], threads=spec["threads"], seed=0, overwrite=True)
    for step in spec["steps"]:
        name, values, out = step["method"], dict(step["values"]), Path(step["out"])
        row = {"tool": "cryohet", "step": step.get("step", name), "box": spec["box"], "n": spec["n"],
               "label": step.get("label", "")}
        if time.time() > deadline - step.get("min_s", 5):
            _emit(res, {**row, "status": "skipped (time budget)"})
            continue
        _cuda_reset()
        t0 = time.perf_counter()
        try:
            if name == "two-bodies":  # data for multibody: the LID hinge, body masks and a bodies STAR
                from cryohet.simulate.bodies import simulate_two_bodies

                simulate_two_bodies(out, **values, device=spec["device"])
            elif name == "mode-data":  # data for fit-modes and train-atomic: the nma run's modes 1-3 moving it
                mode_data(out, **values, device=spec["device"])
            elif name == "ensemble-data":  # data for reweight: frames of the open -> closed transition
                from cryohet.simulate.ensemble import simulate_ensemble

                simulate_ensemble(out, **values)
            else:
                run_method(methods[name], {**values, **common}, out)
        except Exception as exc:  # a failed step is a row of the table, the check goes on
            _emit(res, {**row, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
            if name in DATA_STEPS:
                return
            continue
        row.update(status="ok", wall_s=time.perf_counter() - t0, peak_gpu_gb=_cuda_peak_gb())
        if name == "train-vae":
            hist = json.loads((out / "config.json").read_text())["history"]
            row["epoch_s"] = [h["seconds"] for h in hist]
        plan_line = re.search(r"memory plan: ([0-9.]+) GB", (out / "run.log").read_text()) \
            if (out / "run.log").exists() else None
        if plan_line:  # train-vae's and principal-volumes' plan, beside the measured peak
            row["plan_gb"] = float(plan_line.group(1))
        _emit(res, row)


def placed_model(path: Path, box: int, apix: float) -> Path:
    """The bundled molecule's heavy atoms placed in the map frame of ``box`` × ``apix`` (a PDB file)."""
    from cryohet.io.atomic_model import read_atoms, write_models
    from cryohet.simulate.modes import place_in_box
    from cryohet.simulate.molecules import DEFAULT_MOLECULE

    atoms = place_in_box(read_atoms(DEFAULT_MOLECULE, "heavy"), box, apix)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_models(path, atoms, atoms.xyz_A[None])
    return path


def mode_data(out: Path, modes: str, n_particles: int, box: int, apix: float, device: str) -> None:
    """Particles of the molecule moved along modes 1-3 of an nma run's ``modes.npz`` (200 states, SNR 0.1)."""
    import numpy as np

    from cryohet.io.atomic_model import Atoms
    from cryohet.simulate.modes import draw_amplitudes, mode_conformations
    from cryohet.simulate.simulate import simulate_particles

    with np.load(Path(modes) / "modes.npz", allow_pickle=False) as f:
        atoms = Atoms(f["coords_A"], f["weight"], f["chain"], f["resseq"], f["resname"], f["name"], f["element"],
                      Path(modes))
        vecs = f["modes"][:3]
    amp = draw_amplitudes(200, np.array([3.0, 2.0, 2.0]), np.random.default_rng(0))
    conf = mode_conformations(atoms, vecs, amp, box, apix, max(6.0, 3 * apix), device=device)
    simulate_particles(conf, out, n_particles, 0.1, seed=0, write_maps=False)


def _run_drgn_command(module: str, args: list[str]) -> None:
    import argparse as ap
    import importlib

    m = importlib.import_module(f"cryodrgn.commands.{module}")
    p = ap.ArgumentParser()
    m.add_args(p)
    m.main(p.parse_args(args))


def child_cryodrgn(spec: dict[str, Any]) -> None:
    """cryoDRGN's parse_pose_star, parse_ctf_star (phase-shift NaN set to 0) and train_vae on one dataset."""
    import pickle

    import numpy as np

    res, work, star = Path(spec["results"]), Path(spec["work"]), spec["star"]
    row = {"tool": "cryoDRGN", "step": "train-vae", "box": spec["box"], "n": spec["n"], "label": spec["label"]}
    work.mkdir(parents=True, exist_ok=True)
    pose, ctf, out = work / "pose.pkl", work / "ctf.pkl", work / "train"
    try:
        _run_drgn_command("parse_pose_star", [star, "-o", str(pose)])
        _run_drgn_command("parse_ctf_star", [star, "-o", str(ctf)])
        params = pickle.loads(ctf.read_bytes())
        params[np.isnan(params)] = 0.0  # no rlnPhaseShift column: cryoDRGN leaves NaN, and its CTF is then NaN
        ctf.write_bytes(pickle.dumps(params))
        a = spec["arch"]
        args = [star, "--poses", str(pose), "--ctf", str(ctf), "--zdim", str(a["zdim"]), "-n", str(a["epochs"]),
                "-b", str(a["batch"]), "--lr", str(a["lr"]), "--enc-layers", str(a["layers"]), "--enc-dim",
                str(a["dim"]), "--dec-layers", str(a["layers"]), "--dec-dim", str(a["dim"]), "--seed", "0",
                "--max-threads", str(spec["threads"]), "--checkpoint", str(a["epochs"]), "--no-analysis",
                "-o", str(out)]
        _cuda_reset()
        t0 = time.perf_counter()
        _run_drgn_command("train_vae", args)
        wall = time.perf_counter() - t0
    except Exception as exc:  # reported as the row of the table
        _emit(res, {**row, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
        return
    text = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    epochs = [int(h) * 3600 + int(m) * 60 + float(s)
              for h, m, s in re.findall(r"=====> Epoch: \d+ .*Finished in (\d+):(\d+):([\d.]+)", text)]
    _emit(res, {**row, "status": "ok" if epochs else "failed: no epoch times in run.log", "wall_s": wall,
                "peak_gpu_gb": _cuda_peak_gb(), "epoch_s": epochs})


# --------------------------------------------------------------------------------------------------- parent

def cryodrgn_version() -> str | None:
    """cryoDRGN's version when it can be imported here, else None."""
    if importlib.util.find_spec("cryodrgn") is None:
        return None
    probe = subprocess.run([sys.executable, "-c", "import cryodrgn; print(cryodrgn.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return None
    return probe.stdout.strip() or None


def run_child(kind: str, spec: dict[str, Any], log: Path, timeout: float) -> str:
    """Run a child of this script; 'ok', 'timeout' or 'exit N' (its output in ``log``)."""
    spec_path = log.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, f"_{kind}", str(spec_path)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return "timeout"
    return "ok" if proc.returncode == 0 else f"exit {proc.returncode}"


def plan(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The jobs in order of importance: per box, simulate + reconstruct + train-vae, then cryoDRGN; then
    train-vae on the first box without the prepared-image cache and/or the background reader (``LOADER_VARIANTS``);
    principal-volumes, kernel-volumes, manifold-images, manifold-volumes, classify, abinit, abinit-het,
    hypermolecule and moments for every box (the
    steps whose GPU time is least known); then multibody on two-body data (``simulate_two_bodies``, at most 1000
    particles) for every box."""
    jobs: list[dict[str, Any]] = []
    n_global, n_local = (2, 1) if a.cpu_smoke else (15, 3)
    arch = dict(zdim=a.zdim, epochs=a.epochs, batch=a.batch, lr=a.lr, layers=a.layers, dim=a.dim)
    for box, n in zip(a.boxes, a.n, strict=True):
        d = a.work / f"box{box}"
        apix = round(FIELD_A / box, 4)
        star = str(d / "sim" / "particles.star")
        sim = dict(box=box, apix=apix, n_particles=n, snr=0.1, n_states=20, resolution_A=max(6.0, 3 * apix))
        vae = dict(particles=star, zdim=a.zdim, epochs=a.epochs, batch_size=a.batch, lr=a.lr, enc_layers=a.layers,
                   enc_dim=a.dim, dec_layers=a.layers, dec_dim=a.dim)
        jobs.append(dict(kind="ours", box=box, n=n, steps=[
            dict(method="simulate", values=sim, out=str(d / "sim"), min_s=5),
            dict(method="reconstruct", values=dict(particles=star), out=str(d / "reconstruct"), min_s=5),
            dict(method="train-vae", values=vae, out=str(d / "vae"), min_s=10,
                 label=f"{a.layers}×{a.dim}, z {a.zdim}, batch {a.batch}, {a.epochs} epoch(s)"),
        ]))
        jobs.append(dict(kind="cryodrgn", box=box, n=n, star=star,
                         work=str(d / "cryodrgn"), arch=arch,
                         label=f"{a.layers}×{a.dim}, z {a.zdim}, batch {a.batch}, {a.epochs} epoch(s)"))
    first = jobs[0]["steps"][2]  # the first box's train-vae
    jobs.append(dict(kind="ours", box=a.boxes[0], n=a.n[0], steps=[
        dict(method="train-vae", step=f"train-vae, {tail}", values={**first["values"], **extra},
             out=f"{first['out']}_{i}", min_s=10, label=first["label"]) for i, (tail, extra) in
        enumerate(LOADER_VARIANTS[-1:] if a.cpu_smoke else LOADER_VARIANTS)]))  # the smoke: both off, once
    for box, n in zip(a.boxes, a.n, strict=True):
        d = a.work / f"box{box}"
        apix = round(FIELD_A / box, 4)
        pv = dict(particles=str(d / "sim" / "particles.star"), n_components=3, resolution_A=4 * apix,
                  max_iter=a.pv_iter, tol=0.0, movie_frames=2)
        cls = dict(particles=str(d / "sim" / "particles.star"), K=3, iterations=a.pv_iter)
        jobs.append(dict(kind="ours", box=box, n=n, steps=[
            dict(method="principal-volumes", values=pv, out=str(d / "pv"), min_s=10,
                 label=f"K 3, {a.pv_iter} EM iterations, limit 4 px (working box {box // 2})"),
            dict(method="kernel-volumes", values=dict(run=str(d / "pv"), n_points=3), out=str(d / "kernel"),
                 min_s=10, label="3 points on principal-volumes' latents, 6 neighbourhoods, local resolution"),
            dict(method="manifold-images", values=dict(particles=str(d / "sim" / "particles.star"), n_frames=3,
                                                       spectral_functions=2),
                 out=str(d / "manifold"), min_s=10,
                 label="defaults (15 Å, 100 a direction, 2 refinement rounds), 3 kernel and spectral maps"),
            dict(method="manifold-volumes", values=dict(particles=str(d / "sim" / "particles.star"), n_bootstrap=4),
                 out=str(d / "manifold_volumes"), min_s=10,
                 label="4 bootstrap resamples × 4 classes (10 iterations, 15 Å), 4 state maps at the full box"),
            dict(method="classify", values=cls, out=str(d / "classify"), min_s=10,
                 label=f"K 3, {a.pv_iter} iterations, Nyquist (working box {box})"),
            dict(method="abinit", values=dict(particles=str(d / "sim" / "particles.star"), global_iterations=n_global,
                                              local_iterations=n_local),
                 out=str(d / "abinit"), min_s=10,
                 label=f"poses hidden; {n_global} global iterations (300 particles each, all in the last), "
                       f"{n_local} local"),
            dict(method="abinit-het", values=dict(particles=str(d / "sim" / "particles.star"),
                                                  global_iterations=n_global, local_iterations=n_local, rounds=1,
                                                  epochs=a.epochs, zdim=a.zdim),
                 out=str(d / "abinit_het"), min_s=10,
                 label=f"poses hidden; consensus as abinit's, then {a.epochs} epoch(s), one re-search against the "
                       f"decoder at each latent, {a.epochs} more"),
            dict(method="hypermolecule", values=dict(particles=str(d / "sim" / "particles.star"),
                                                     resolution_A=4 * apix, iterations=a.pv_iter),
                 out=str(d / "hypermolecule"), min_s=10,
                 label=f"Legendre degree 3, {a.pv_iter} Monte Carlo EM iterations, limit 4 px"),
            dict(method="moments", values=dict(particles=str(d / "sim" / "particles.star"), n_components=3,
                                               resolution_A=8 * apix),
                 out=str(d / "moments"), min_s=10, label="K 3, covariance limited to 8 px (mean at full box)")]))
    for box, n in zip(a.boxes, a.n, strict=True):
        d = a.work / f"box{box}" / "bodies"
        bodies = dict(n_particles=min(n, 1000), box=box, apix=round(FIELD_A / box, 4), snr=2.0)
        star = str(d / "data" / "particles.star")
        # the consensus map: the mean of the true maps the simulation writes (maps/mean.mrc)
        mb = dict(particles=star, map=str(d / "data" / "maps" / "mean.mrc"), bodies=str(d / "data" / "bodies.star"),
                  iterations=2)
        jobs.append(dict(kind="ours", box=box, n=bodies["n_particles"], steps=[
            dict(method="two-bodies", values=bodies, out=str(d / "data"), min_s=5),
            dict(method="multibody", values=mb, out=str(d / "multibody"), min_s=10,
                 label="2 bodies, 2 iterations, Nyquist")]))
    for box, n in zip(a.boxes, a.n, strict=True):  # deformation models on the first job's simulation and map
        d = a.work / f"box{box}"
        apix = round(FIELD_A / box, 4)
        star, cmap = str(d / "sim" / "particles.star"), str(d / "reconstruct" / "map.mrc")
        n_def = min(n, 5000)
        res = max(8.0, 3 * apix)
        deform = dict(particles=star, consensus_map=cmap, zdim=2, epochs=a.epochs * 3, resolution_A=res, n_maps=3,
                      n_clusters=0)
        jobs.append(dict(kind="ours", box=box, n=n_def, steps=[
            dict(method="train-gmm", values={**deform, "halfsets": False}, out=str(d / "gmm"), min_s=10,
                 label=f"z 2, {a.epochs * 3} epochs, {res:g} Å, one model (no half-sets)"),
            dict(method="train-deform", step="train-deform, zernike", values={**deform, "field": "zernike"},
                 out=str(d / "deform_zernike"), min_s=10, label=f"Zernike3D L1 3 L2 2, z 2, {a.epochs * 3} epochs"),
            dict(method="train-deform", step="train-deform, flow", values={**deform, "field": "flow"},
                 out=str(d / "deform_flow"), min_s=10, label=f"flow field, z 2, {a.epochs * 3} epochs"),
            dict(method="reconstruct-deformed", values=dict(run=str(d / "deform_zernike")),
                 out=str(d / "reconstruct_deformed"), min_s=10, label="on the Zernike3D run, full box")]))
    for box, n in zip(a.boxes, a.n, strict=True):
        d = a.work / f"box{box}" / "atomic"
        apix = round(FIELD_A / box, 4)
        model = str(placed_model(d / "placed.pdb", box, apix))
        star = str(d / "modes_data" / "particles.star")
        n_fit = min(n, 2000)
        res = max(8.0, 3 * apix)  # the fits' resolution, Å (coarser than Nyquist at the smoke test's 6 Å/px)
        jobs.append(dict(kind="ours", box=box, n=n_fit, steps=[
            dict(method="nma", step="nma, heavy atoms", values=dict(model=model, selection="heavy",
                                                                     solver=a.nma_solver, movie_modes=1),
                 out=str(d / "nma_heavy"), min_s=5, label=f"1656 heavy atoms, 20 modes, solver {a.nma_solver}"),
            dict(method="nma", step="nma, Cα", values=dict(model=model, n_modes=6, movie_modes=0, solver=a.nma_solver),
                 out=str(d / "nma"),
                 min_s=5,
                 label="214 Cα, 6 modes"),
            dict(method="mode-data", values=dict(modes=str(d / "nma"), n_particles=n_fit, box=box, apix=apix),
                 out=str(d / "modes_data"), min_s=5),
            dict(method="fit-modes", step="fit-modes, direct", values=dict(particles=star, modes=str(d / "nma"),
                                                                            fit="direct", resolution_A=res),
                 out=str(d / "fit_direct"), min_s=10, label="modes 1-3, direct, 60 Adam steps per image"),
            dict(method="fit-modes", step="fit-modes, amortised",
                 values=dict(particles=star, modes=str(d / "nma"), fit="amortised", epochs=a.epochs * 5,
                             resolution_A=res),
                 out=str(d / "fit_amortised"), min_s=10, label=f"modes 1-3, amortised, {a.epochs * 5} epochs"),
            dict(method="train-atomic", values=dict(particles=star, model=model, zdim=2, epochs=a.epochs * 5,
                                                    resolution_A=res),
                 out=str(d / "train_atomic"), min_s=10, label=f"214 residues, z 2, {a.epochs * 5} epochs"),
            dict(method="ensemble-data", values=dict(weights=[4, 1, 2, 3, 6, 2, 1, 1, 3, 2], n_particles=n_fit,
                                                     snr=0.1, box=box, apix=apix),
                 out=str(d / "ensemble"), min_s=5),
            dict(method="reweight", values=dict(particles=str(d / "ensemble" / "particles" / "particles.star"),
                                                trajectory=str(d / "ensemble" / "trajectory.dcd"),
                                                topology=str(d / "ensemble" / "topology.pdb")),
                 out=str(d / "reweight"), min_s=10, label="10 frames of 1656 atoms, defaults")]))
    return jobs


def run_all(a: argparse.Namespace) -> list[dict[str, Any]]:
    a.work.mkdir(parents=True, exist_ok=True)
    res = a.work / "results.jsonl"
    res.unlink(missing_ok=True)
    t_end = time.time() + a.budget_s
    have_drgn = not a.no_cryodrgn and a.drgn_version is not None
    simulated_ok: dict[int, bool] = {}
    jobs = [j for j in plan(a) if j["kind"] == "ours" or have_drgn]
    for i, job in enumerate(jobs):
        left = t_end - time.time()
        # the jobs come in order of importance: this one may use all the time left but RESERVE_S for each later one
        timeout = max(min(left, 30.0), left - RESERVE_S * (len(jobs) - i - 1))
        tag = f"{job['kind']}_box{job['box']}_{i}"
        if left < 10:
            status = "timeout"
        elif job["kind"] == "cryodrgn":
            if not simulated_ok.get(job["box"], False):
                continue
            spec = dict(results=str(res), work=job["work"], star=job["star"], box=job["box"], n=job["n"],
                        label=job["label"], arch=job["arch"], threads=a.threads)
            status = run_child("cryodrgn", spec, a.work / f"{tag}.log", timeout)
        else:
            spec = dict(results=str(res), box=job["box"], n=job["n"], steps=job["steps"], device=a.device,
                        threads=a.threads, deadline=time.time() + timeout)
            status = run_child("ours", spec, a.work / f"{tag}.log", timeout)
        rows = [json.loads(line) for line in res.read_text().splitlines()] if res.exists() else []
        done = {(r["tool"], r["step"], r["box"]) for r in rows}
        if job["kind"] == "ours":
            simulated_ok[job["box"]] = simulated_ok.get(job["box"], False) or any(
                r["step"] == "simulate" and r["box"] == job["box"] and r["status"] == "ok" for r in rows)
            missing = [s.get("step", s["method"]) for s in job["steps"]
                       if ("cryohet", s.get("step", s["method"]), job["box"]) not in done]
            for m in missing:
                _emit(res, {"tool": "cryohet", "step": m, "box": job["box"], "n": job["n"],
                            "status": f"not finished ({status}; see {tag}.log)"})
        elif ("cryoDRGN", "train-vae", job["box"]) not in done:
            _emit(res, {"tool": "cryoDRGN", "step": "train-vae", "box": job["box"], "n": job["n"],
                        "status": f"not finished ({status}; see {tag}.log)"})
    return [json.loads(line) for line in res.read_text().splitlines()] if res.exists() else []


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _last_epoch(r: dict[str, Any] | None) -> float | None:
    if not r or r.get("status") != "ok" or not r.get("epoch_s"):
        return None
    return float(r["epoch_s"][-1])


def table(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    by = {(r["tool"], r["step"], r["box"]): r for r in rows}
    out = [f"| step | box | N | cryohet (s) | cryoDRGN {a.drgn_version or '4.3.1'} (s) | ratio cryohet / cryoDRGN "
           "| peak GPU GB: cryohet / cryoDRGN | settings, notes |", "|---|---|---|---|---|---|---|---|"]
    for step in ("simulate", "reconstruct", "train-vae", *(f"train-vae, {t}" for t, _ in LOADER_VARIANTS),
                 "principal-volumes", "kernel-volumes", "manifold-images",
                 "manifold-volumes", "classify", "abinit", "abinit-het", "hypermolecule", "moments", "two-bodies",
                 "multibody", "nma, heavy atoms", "nma, Cα",
                 "mode-data", "fit-modes, direct", "fit-modes, amortised", "train-atomic", "ensemble-data", "reweight",
                 "train-gmm", "train-deform, zernike", "train-deform, flow", "reconstruct-deformed"):
        for box, n in zip(a.boxes, a.n, strict=True):
            ours = by.get(("cryohet", step, box))
            if ours is None:
                continue
            note = ours.get("label", "")
            if ours["status"] != "ok":
                note = (note + "; " if note else "") + f"cryohet: {ours['status']}"
            if step.startswith("train-vae, "):  # the loader's variants against the plain row (cache, reader on)
                t_o, t_plain = _last_epoch(ours), _last_epoch(by.get(("cryohet", "train-vae", box)))
                if ours["status"] == "ok" and ours.get("epoch_s"):
                    note += f"; first epoch {ours['epoch_s'][0]:.2f} s"
                if t_o is not None and t_plain:
                    note += f"; {t_o / t_plain:.2f} × the plain row's last epoch (cache auto, reader on)"
                out.append(f"| {step}, s per epoch (last) | {box} | {n} | {_fmt(t_o)} | - | - | "
                           f"{_fmt(ours.get('peak_gpu_gb'))} / - | {note} |")
            elif step == "train-vae":
                theirs = by.get(("cryoDRGN", step, box))
                t_o, t_d = _last_epoch(ours), _last_epoch(theirs)
                if theirs is None:
                    note += "; cryoDRGN not run" + ("" if a.drgn_version else " (cannot import cryodrgn)")
                elif theirs["status"] != "ok":
                    note += f"; cryoDRGN: {theirs['status']}"
                ratio = _fmt(t_o / t_d) if t_o is not None and t_d is not None else "-"
                walls = [f"{who} {r['wall_s']:.0f} s" for who, r in (("cryohet", ours), ("cryoDRGN", theirs))
                         if r and r["status"] == "ok"]
                if walls:
                    note += "; whole run: " + ", ".join(walls)
                if ours["status"] == "ok" and ours.get("epoch_s"):
                    note += f"; cryohet outside its epochs {ours['wall_s'] - sum(ours['epoch_s']):.1f} s"
                if ours.get("plan_gb") is not None:
                    note += f"; memory plan {ours['plan_gb']:.2f} GB"
                peak_d = _fmt(theirs.get("peak_gpu_gb")) if theirs and theirs["status"] == "ok" else "-"
                out.append(f"| train-vae, s per epoch (last) | {box} | {n} | {_fmt(t_o)} | {_fmt(t_d)} | {ratio} | "
                           f"{_fmt(ours.get('peak_gpu_gb'))} / {peak_d} | {note} |")
            else:
                wall = ours.get("wall_s") if ours["status"] == "ok" else None
                if ours.get("plan_gb") is not None:
                    note += f"; memory plan {ours['plan_gb']:.2f} GB"
                out.append(f"| {step} | {box} | {n} | {_fmt(wall, 1)} | - | - | {_fmt(ours.get('peak_gpu_gb'))} / - "
                           f"| {note} |")
    return "\n".join(out)


def help_seconds() -> float:
    """Wall seconds of ``cryohet --help`` (the median of three), a fixed cost of every command."""
    cmd = [sys.executable, "-c", "import sys; from cryohet.cli import main; sys.exit(main())", "--help"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def header(a: argparse.Namespace, elapsed: float) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [f"GPU check, {time.strftime('%Y-%m-%d')}: {gpu}; torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}); cryohet device {a.device}; cryoDRGN {a.drgn_version or '-'}; "
             f"{a.threads} CPU thread(s) per program; {elapsed:.0f} s for the speed part."]
    lines.append(f"`cryohet --help`: {help_seconds():.2f} s (imports and parsers; the engine is imported only to run).")
    if a.tests_summary and Path(a.tests_summary).exists():
        lines.append(f"Engine tests on this machine: {Path(a.tests_summary).read_text().strip()}")
    return "\n\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("_ours", "_cryodrgn"):
        spec = json.loads(Path(sys.argv[2]).read_text())
        (child_ours if sys.argv[1] == "_ours" else child_cryodrgn)(spec)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the whole pipeline, tiny, on the CPU: box 32, 200 particles, 1 epoch, 3 × 64 networks")
    p.add_argument("--work", type=Path, default=Path("/tmp/cryohet_gpu_check"),
                   help="working folder (emptied first: every run starts from new data)")
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--n", type=int, nargs="+", default=[2000, 1000], help="particles per box")
    p.add_argument("--nma_solver", default="torch", choices=("torch", "prody", "auto"),
                   help="solver of the nma steps (torch: the GPU path; ProDy is not on the GPU machine)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="batch size of both programs (cryoDRGN's default: 8)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--pv_iter", type=int, default=5, help="EM iterations of principal-volumes")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", help="cryohet's --device")
    p.add_argument("--budget_s", type=float, default=400.0, help="deadline for the speed part, seconds")
    p.add_argument("--no_cryodrgn", action="store_true")
    p.add_argument("--tests_summary", default="", help="a file holding the engine tests' summary line")
    a = p.parse_args()
    if a.cpu_smoke:
        a.device, a.boxes, a.n, a.epochs, a.dim, a.pv_iter = "cpu", [32], [200], 1, 64, 2
        a.threads = min(a.threads, 2)
        a.budget_s = min(a.budget_s, 110.0)
    if len(a.n) != len(a.boxes):
        p.error("give one --n per --boxes")
    a.drgn_version = None if a.no_cryodrgn else cryodrgn_version()
    shutil.rmtree(a.work, ignore_errors=True)
    t0 = time.time()
    rows = run_all(a)
    report = header(a, time.time() - t0) + "\n\n" + table(rows, a) + "\n"
    print("\n" + report, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.md").write_text(report)
        Path(out, "gpu_check.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()},
                                                            "rows": rows}, indent=1))
        with tarfile.open(Path(out, "gpu_check_logs.tar.gz"), "w:gz") as tar:  # the children's and tools' logs
            for log in sorted(a.work.rglob("*.log")):
                if log.stat().st_size < 20 * 2**20:
                    tar.add(log, arcname=str(log.relative_to(a.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
