"""Deformation models (issue #12) side by side: train-gmm, train-deform --field zernike|flow against train-vae,
principal-volumes and cryoSPHERE (the PyPI peer) on the same simulated motions, and reconstruct-deformed against
reconstruct.

    .venv/bin/python bench/bench_deform.py --out /tmp/bench_deform            # full CPU run (~25 min idle, estimated)
    .venv/bin/python bench/bench_deform.py --out /tmp/bench_deform --quick    # smoke run (a few minutes)

Data: ``cryohet.validation.datasets.make_dataset`` (the simulator's hinge, two-part and interpolation motions of the
bundled adenylate kinase, ground truth kept), each at the SNRs named in --runs. Every method runs through its method
description (the code path of ``cryohet <method>``) and is scored by ``validation.score.score_run``: latent accuracy
(|Spearman| of PC1 against τ for 1-D motions, k-NN overlap for two-part) and per-image FSC AUC against each
particle's true map, with two references: the population-weighted mean of the true maps ('true mean map') and
``cryohet reconstruct`` of the same particles used as every particle's map ('homogeneous map'). Seconds per epoch
come from each run's checkpoint history, as a ratio to train-vae's. reconstruct-deformed runs on every train-gmm and
train-deform result: FSC AUC and FSC = 0.5 resolution of its map against the true map it matches best (the true
canonical state), half-map resolution (FSC 0.143), each beside ``cryohet reconstruct``'s. Methods that are not (yet)
in cryohet are skipped with the reason printed. cryoSPHERE runs from its own virtual environment
(--cryosphere_python) through bench/cryosphere_cpu.py: see docs/benchmarks.md for what it needs and why the shim.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from bench_train_atomic import epoch_seconds, num  # noqa: E402

from cryohet.errors import InputError  # noqa: E402
from cryohet.io.mrc import read_map  # noqa: E402
from cryohet.methods import get_method  # noqa: E402
from cryohet.methods.base import Method  # noqa: E402
from cryohet.record import read_record  # noqa: E402
from cryohet.runner import run_method  # noqa: E402
from cryohet.validation import metrics as M  # noqa: E402
from cryohet.validation.datasets import BenchmarkDataset, load_dataset, make_dataset  # noqa: E402
from cryohet.validation.score import score, score_run, score_true_answer  # noqa: E402
from cryohet.validation.sources import ParticleVolumes  # noqa: E402

CRYOSPHERE_PY = Path("/work/peers/cryosphere-venv/bin/python")
SHIM = Path(__file__).resolve().parent / "cryosphere_cpu.py"


def dataset(name: str, snr: float, a: argparse.Namespace) -> BenchmarkDataset:
    """The benchmark folder ``name`` at ``snr`` (made once, reused)."""
    root = a.out / f"{name}_snr{snr:g}"
    if (root / "benchmark.json").exists():
        return load_dataset(root)
    return make_dataset(name, root, box=a.box, n_particles=a.n, snr=snr)


def values_for(method: Method, roles: dict[str, str], wanted: dict[str, Any]) -> dict[str, Any]:
    """A method's values: the paths of ``roles`` for its parameters of that ``input_role`` (first of each role)
    and the ``wanted`` values it declares (others are left out: the methods differ in their parameters)."""
    out: dict[str, Any] = {}
    for p in method.params + method.common_params:
        if p.input_role in roles:
            out.setdefault(p.name, roles.pop(p.input_role))
        elif p.name in wanted:
            out[p.name] = wanted[p.name]
    return out


def run(name: str, roles: dict[str, str], wanted: dict[str, Any], run_dir: Path) -> tuple[Path | None, str, float]:
    """Run method ``name`` into ``run_dir``; (run_dir, "", seconds) or (None, why it was skipped, NaN)."""
    try:
        method = get_method(name)
    except KeyError:
        return None, f"this cryohet has no method {name!r} (yet)", float("nan")
    values = values_for(method, dict(roles), wanted)
    t0 = time.perf_counter()
    try:
        run_method(method, values, run_dir, command=["bench_deform.py", name])
    except Exception as exc:  # a method under development must not take the other methods' results down
        return None, f"FAILED: {type(exc).__name__}: {exc}", float("nan")
    seconds = time.perf_counter() - t0
    print(f"  {name} {values.get('field', '')}: {seconds:.0f} s", flush=True)
    return run_dir, "", seconds


def per_epoch(run_dir: Path) -> float:
    """Mean seconds per epoch (the shared trainer's checkpoint history); NaN for methods without one."""
    try:
        return epoch_seconds(run_dir)
    except (OSError, InputError):
        return float("nan")


def best_true_match(map_path: Path, ds: BenchmarkDataset) -> dict[str, float]:
    """FSC of a map against the true map it matches best: AUC, FSC = 0.5 resolution (Å), that state's τ."""
    vol, _ = read_map(map_path)
    box = min(vol.shape[-1], ds.box)
    apix = ds.apix * ds.box / box
    true = ds.true_model()
    fits = [M.volume_fsc(M.match_box(vol, box), M.match_box(true.map(k, keep=False), box), apix, None)
            for k in range(ds.n_states)]
    k = int(np.argmax([f["auc"] for f in fits]))
    return {"auc": fits[k]["auc"], "res_0.5_A": fits[k]["res_0.5_A"], "tau": ds.state_tau[k].tolist()}


def half_map_resolution(run_dir: Path) -> float:
    """The run's half-map FSC = 0.143 resolution (Å) from its record's fsc output."""
    fsc = read_record(run_dir).of_kind("fsc")
    return float(fsc[0].meta.get("resolution_A", "nan")) if fsc else float("nan")


def map_output(run_dir: Path) -> Path:
    """The run's first ``volume`` output (reconstruct's and reconstruct-deformed's full map)."""
    return run_dir / read_record(run_dir).of_kind("volume")[0].path


# ------------------------------------------------------------------------------------------------ cryoSPHERE


def cryosphere_inputs(ds: BenchmarkDataset, work: Path, epochs: int, zdim: int, segments: int,
                      lr: float) -> Path:
    """cryoSPHERE's inputs for dataset ``ds`` in ``work``; returns its parameters.yaml.

    The base structure is the bundled open model (the simulator's state τ = 0) moved into the map frame: the
    simulator centres every state's map on the mean of the states' centres, so the shift is the centre of mass of
    true map 0 (the open model is centred on its own centre of mass). The STAR gains rlnPhaseShift 0: cryoSPHERE
    0.6.1 fills a missing column with NaN and its CTF becomes NaN.
    """
    import gemmi

    from cryohet.io.star import read_star, write_star
    from cryohet.simulate.molecules import default_molecule

    work.mkdir(parents=True, exist_ok=True)
    vol = ds.true_model().map(0, keep=False).astype(np.float64)
    grid = (np.indices(vol.shape).reshape(3, -1) - ds.box // 2) * ds.apix  # (z, y, x) Å from the box centre
    shift_xyz = (grid * vol.reshape(-1)).sum(1)[::-1] / vol.sum()
    st = default_molecule()
    for model in st:
        for chain in model:
            for res in chain:
                for atom in res:
                    atom.pos = gemmi.Position(*(np.array(atom.pos.tolist()) + shift_xyz))
    st.write_pdb(str(work / "base_structure.pdb"))
    blocks = read_star(ds.particles_star)
    blocks["particles"]["rlnPhaseShift"] = 0.0
    write_star(work / "particles.star", blocks)
    (work / "images.yaml").write_text(json.dumps({"apix": ds.apix, "Npix": ds.box, "Npix_downsize": ds.box,
                                                  "sigma_gmm": 2}))
    res_A = float(ds.meta.get("motion", {}).get("resolution_A", 2.5 * ds.apix))
    params = {
        "name": f"bench_{ds.name}", "wandb": False, "wandb_project": "none", "folder_path": str(work),
        "base_structure_path": "base_structure.pdb", "image_yaml": "images.yaml",
        "particles_path": str(ds.root), "cs_star_file": {"file": str(work / "particles.star")},
        "segmentation_config": {"part1": {"all_protein": True, "N_segm": segments,
                                          "segmentation_start": {"type": "uniform"},
                                          "segmentation_prior": {"type": "uniform"}}},
        "lp_bandwidth": res_A, "loss_mask_radius": 1, "input_mask_radius": 1, "latent_dimension": zdim,
        "tau_segmentation": 0.05, "device": "CPU", "num_workers": 0, "amortized": True, "N_images": ds.n_particles,
        "N_epochs": epochs, "batch_size": 128, "epsilon_kl": "1e-10", "seed": 0, "deterministic_cuda": False,
        "encoder": {"hidden_dimensions": [512, 256, 64, 64]}, "decoder": {"hidden_dimensions": [512, 512]},
        "optimizer": {"name": "adam", "learning_rate": lr, "learning_rate_segmentation": 10 * lr},
        "loss": {"clashing_loss": {"full_clashing_loss": True, "clashing_cutoff": 4, "min_clashing_cutoff_pairs": 4,
                                   "max_clashing_cutoff_pairs": 10, "schedule": "constant", "beta": 0.1},
                 "continuity_loss": {"schedule": "constant", "beta": 0.1},
                 "KL_prior_latent": {"schedule": "linear"}, "KL_prior_segmentation_mean": {"schedule": "linear"},
                 "KL_prior_segmentation_std": {"schedule": "linear"},
                 "KL_prior_segmentation_proportions": {"schedule": "cyclical", "M": 5, "R": 0.5},
                 "l2_pen": {"schedule": "constant", "beta": 1e-6}},
        "resume_training": {"model": None, "segmentation": None},
    }
    path = work / "parameters.yaml"
    # JSON is YAML, but PyYAML reads 1e-06 as a string: give exponents a decimal point (1.0e-06)
    path.write_text(re.sub(r"(?<![\d.])(\d+)e([-+]\d+)", r"\1.0e\2", json.dumps(params, indent=1)))
    return path


def cryosphere_volumes(ds: BenchmarkDataset, ca_A: np.ndarray, base_pdb: Path) -> ParticleVolumes:
    """Each particle's map from cryoSPHERE's decoded Cα positions: every heavy atom of a residue moved by its Cα's
    displacement, rendered as the simulator renders the true maps."""
    from cryohet.io.atomic_model import atom_coords, atom_weights, iter_atoms, load_structure
    from cryohet.simulate.density import atoms_to_map

    st = load_structure(base_pdb)
    xyz, w = atom_coords(st), atom_weights(st)
    residue, ca_rows, seen = [], [], {}
    for chain, res, atom in iter_atoms(st):
        key = (chain.name, res.seqid.num, res.seqid.icode)
        seen.setdefault(key, len(seen))
        residue.append(seen[key])
        if atom.name == "CA":
            ca_rows.append(len(residue) - 1)
    residue = np.asarray(residue)
    base_ca = xyz[ca_rows]
    res_A = float(ds.meta.get("motion", {}).get("resolution_A", 2.5 * ds.apix))

    def maps(idx: np.ndarray) -> np.ndarray:
        moved = xyz[None] + (ca_A[idx] - base_ca[None])[:, residue]
        return np.stack([atoms_to_map(m, ds.box, ds.apix, res_A, centre_A=np.zeros(3), weights=w) for m in moved])

    return ParticleVolumes(maps, ds.box, ds.apix, "cryoSPHERE Cα displacements applied to residues")


def run_cryosphere(ds: BenchmarkDataset, a: argparse.Namespace) -> tuple[dict | None, float, float, str]:
    """cryoSPHERE on ``ds`` through the CPU shim; (score summary, seconds, seconds per epoch, why skipped)."""
    nan = float("nan")
    if not a.cryosphere_python.exists():
        return None, nan, nan, f"no cryoSPHERE environment at {a.cryosphere_python}"
    work = a.out / f"{ds.root.name}_cryosphere"
    yaml = cryosphere_inputs(ds, work, a.epochs, a.zdim, a.segments, a.cryosphere_lr)
    t0 = time.perf_counter()
    proc = subprocess.run([str(a.cryosphere_python), str(SHIM), str(yaml), str(work / "out"), "--threads",
                           str(a.threads)], capture_output=True, text=True)
    (work / "shim.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return None, nan, nan, f"cryoSPHERE failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}"
    seconds = time.perf_counter() - t0
    print(f"  cryoSPHERE: {seconds:.0f} s", flush=True)
    z = np.load(work / "out" / "z.npy")
    pv = cryosphere_volumes(ds, np.load(work / "out" / "ca_A.npy"), work / "base_structure.pdb")
    summary = score(ds, z, pv, label="cryoSPHERE")["summary"]
    return summary, seconds, float(np.mean(json.loads((work / "out" / "epoch_seconds.json").read_text()))), ""


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_deform"), help="folder for the data and runs")
    ap.add_argument("--runs", nargs="+", default=["hinge:0.1", "two-part:0.1", "interpolation:0.1", "hinge:1"],
                    help="dataset:SNR pairs (datasets: hinge, two-part, interpolation)")
    ap.add_argument("--box", type=int, default=48, help="image box, pixels (128 Å field of view)")
    ap.add_argument("--n", type=int, default=1500, help="particles per dataset")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of every trained method")
    ap.add_argument("--zdim", type=int, default=2, help="latent dimension of every trained method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cryosphere_python", type=Path, default=CRYOSPHERE_PY,
                    help="Python of cryoSPHERE's own virtual environment (skipped when absent)")
    ap.add_argument("--segments", type=int, default=6, help="cryoSPHERE's number of segments")
    ap.add_argument("--cryosphere_lr", type=float, default=3e-4, help="cryoSPHERE's learning rate "
                    "(its default 3e-5 is meant for hundreds of epochs; segmentation: 10×)")
    ap.add_argument("--quick", action="store_true", help="smoke run: hinge at SNR 1, box 32, 300 particles, "
                    "2 epochs")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.box, a.n, a.epochs = ["hinge:1"], 32, 300, 2
    t_start = time.perf_counter()
    scores, recs, skipped = [], [], []
    for spec in a.runs:
        name, snr = spec.split(":")
        bench_dataset(dataset(name, float(snr), a), f"{name} SNR {float(snr):g}", a, scores, recs, skipped)
    report(a, scores, recs, skipped, time.perf_counter() - t_start)


def bench_dataset(ds: BenchmarkDataset, tag: str, a: argparse.Namespace, scores: list, recs: list,
                  skipped: list[str]) -> None:
    """Every method on ``ds``; appends the rows of the two tables and the skipped methods' reasons."""
    common = {"threads": a.threads, "device": a.device, "overwrite": True, "epochs": a.epochs, "zdim": a.zdim,
              "seed": 0}
    # label: (method, its own values, whether it is given the consensus map, i.e. reconstruct's map)
    trained: dict[str, tuple[str, dict[str, Any], bool]] = {
        "train-vae": ("train-vae", {"batch_size": 32, "lr": 1e-3}, False),
        "principal-volumes": ("principal-volumes", {"n_components": a.zdim}, False),
        "train-gmm": ("train-gmm", {"halfsets": False}, True),  # one model: the half-set models only give errors
        "train-deform zernike": ("train-deform", {"field": "zernike"}, True),
        "train-deform flow": ("train-deform", {"field": "flow"}, True),
    }

    def skip(what: str, why: str) -> None:
        skipped.append(f"{tag}: {what} skipped: {why}")
        print("  " + skipped[-1], flush=True)

    print(f"{tag}: {ds.n_particles} particles, box {ds.box}, {ds.apix:.3g} Å/px", flush=True)
    base = a.out / f"{ds.root.name}_runs"
    particles = {"particles": str(ds.particles_star)}
    rec_dir, _, _ = run("reconstruct", particles, common, base / "reconstruct")
    homog = score(ds, None, ParticleVolumes.from_labels([map_output(rec_dir)], np.zeros(ds.n_particles, int)),
                  label="homogeneous")["summary"]["fsc_auc"]
    rec_true, rec_half = best_true_match(map_output(rec_dir), ds), half_map_resolution(rec_dir)
    nan = float("nan")
    scores.append((tag, "truth (ceiling)", score_true_answer(ds)["summary"], homog, nan, nan, nan))
    consensus = {**particles, "volume": str(map_output(rec_dir))}
    vae_epoch = nan
    for label, (method, extra, with_map) in trained.items():
        run_dir, why, seconds = run(method, consensus if with_map else particles, {**common, **extra},
                                    base / label.replace(" ", "_"))
        if run_dir is None:
            skip(label, why)
            continue
        t = per_epoch(run_dir)
        vae_epoch = t if label == "train-vae" else vae_epoch
        scores.append((tag, label, score_run(run_dir, ds.root)["summary"], homog, seconds, t, t / vae_epoch))
        if method in ("train-gmm", "train-deform"):
            fixed, why, _ = run("reconstruct-deformed", {"run": str(run_dir)}, common,
                                base / f"{label.replace(' ', '_')}_corrected")
            if fixed is None:
                skip(f"reconstruct-deformed of {label}", why)
                continue
            recs.append((tag, label, best_true_match(map_output(fixed), ds), half_map_resolution(fixed), rec_true,
                         rec_half))
    s, seconds, t, why = run_cryosphere(ds, a)
    if s is None:
        skip("cryoSPHERE", why)
    else:
        scores.append((tag, "cryoSPHERE (CPU shim)", s, homog, seconds, t, t / vae_epoch))


def report(a: argparse.Namespace, scores: list, recs: list, skipped: list[str], seconds: float) -> None:
    """Print the Markdown tables kept in docs/benchmarks.md."""
    print(f"\n{a.n} particles, box {a.box}, {a.epochs} epochs, zdim {a.zdim}, device {a.device}, {a.threads} "
          f"thread(s); total {seconds / 60:.1f} min\n")
    print("| data | method | latent vs truth (chance) | per-image FSC AUC | true mean map | homogeneous map "
          "| run (s) | s / epoch | × train-vae |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tag, label, s, homog, seconds, t, ratio in scores:
        print(f"| {tag} | {label} | {s['latent_metric']} {num(s['latent_score'], 2)} "
              f"({num(s['latent_chance'], 2)}) | {num(s['fsc_auc'])} | {num(s['mean_map_fsc_auc'])} | {num(homog)} "
              f"| {num(seconds, 0)} | {num(t, 2)} | {num(ratio, 2)} |")
    if recs:
        print("\n| data | corrected by | FSC AUC to truth | FSC 0.5 to truth (Å) | half-map res. (Å) "
              "| reconstruct: AUC | FSC 0.5 (Å) | half-map res. (Å) |")
        print("|---|---|---|---|---|---|---|---|")
        for tag, label, c, c_half, r, r_half in recs:
            print(f"| {tag} | {label} | {num(c['auc'])} | {num(c['res_0.5_A'], 1)} | {num(c_half, 1)} "
                  f"| {num(r['auc'])} | {num(r['res_0.5_A'], 1)} | {num(r_half, 1)} |")
    for line in skipped:
        print("- " + line)


if __name__ == "__main__":
    main()
