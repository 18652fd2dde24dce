"""Multi-body refinement side by side with RELION 3.1.3's (``relion_refine_mpi --continue ... --multibody_masks``).

    .venv/bin/python bench/bench_multibody.py --out /tmp/bench_multibody

Data: ``cryohet.simulate.bodies.simulate_two_bodies``: the bundled adenylate kinase with its LID domain swinging
rigidly about its hinge (uniform over ``--max_angle_deg``), two soft body masks (core + NMP, LID), a RELION bodies
STAR (each body relative to the other, σ angles 10°, σ offsets 2 Å) and per particle the true rotation of each body
relative to the reference position (the LID at the mean hinge angle, where the consensus map has it).

RELION needs a consensus auto-refine to continue from. Cheapest valid one here: ``relion_reconstruct --ctf`` of the
particles at their (true) poses as the reference, then ``mpirun -n 3 relion_refine_mpi --auto_refine
--split_random_halves --skip_align --auto_iter_max 3`` (no pose search: half-maps and noise model at the given
poses; the continuation drops --skip_align). Auto-refine needs MPI (``relion_refine`` without it refuses
--split_random_halves), and ``mpirun`` as root needs ``--allow-run-as-root``. Multi-body refinement then runs with
the options of RELION's tutorial (``--solvent_correct_fsc --oversampling 1 --healpix_order 4
--auto_local_healpix_order 4 --offset_range 3 --offset_step 1.5 --reconstruct_subtracted_bodies``) until it
converges, 3 MPI processes of one thread each (a leader and two followers on the 2 cores).

``cryohet multibody`` gets the same particles and bodies STAR, and as consensus map the mean of RELION's two
consensus half-maps (what RELION's multi-body run starts from).

Scores, per body: per-particle error of the body's rotation relative to the consensus against the truth (angle of
R_estᵀ R_true, degrees: median and mean), for the moving body the Pearson correlation of the estimated and true
hinge angle (rotation vector along the true hinge axis), and the FSC of the body map against the true body map
(the molecule at the reference angle, both times the body's mask): area under the curve and resolution at 0.5;
and the area under the FSC inside the mask's interior (where it is ≥ 0.99): where masks overlap, a body map holds
only its share of the density (both programs subtract the other bodies there, so that body maps put together at
their poses do not count it twice), which the whole-mask score counts against it.
RELION's per-body poses are in the ``data_images_body_<b>`` tables of ``run_data.star`` (rows in the order of its
particles table), Euler angles of the residual rotation in the body's frame (0, 90, 0 = no motion); they and
cryohet's ``body_motions.npy`` are turned into rotations with the same frames
(``cryohet.inference.bodies.relative_rotation``, RELION's ``MlModel::initialiseBodies`` and ``alignWithZ``). Times:
whole-command wall and CPU seconds and peak resident memory (largest process). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from command_cost import Cost, timed  # noqa: E402  (beside this script)

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.inference.bodies import read_bodies, relative_rotation  # noqa: E402
from cryohet.io.mrc import read_map, write_map  # noqa: E402
from cryohet.io.star import read_star  # noqa: E402
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at  # noqa: E402

DIAMETER_A = 100.0  # RELION --particle_diameter: the molecule is about 70 Å long
MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi"]
CONSENSUS_ITERATIONS = 3
#: cryohet's output folder; not "cryohet", which would shadow the package for `python -m cryohet.cli` run there
OURS = "cryohet_multibody"
#: mask value from which a voxel counts as the body's interior
INTERIOR = 0.99




def make_data(d: Path, n: int, box: int, apix: float, snr: float, max_angle_deg: float, seed: int) -> None:
    from cryohet.simulate.bodies import simulate_two_bodies

    simulate_two_bodies(d, n_particles=n, box=box, apix=apix, snr=snr, max_angle_deg=max_angle_deg, seed=seed)
    (d / "bench.json").write_text(json.dumps({"n": n, "box": box, "apix": apix, "snr": snr,
                                              "max_angle_deg": max_angle_deg, "seed": seed}))


def true_map(d: Path) -> np.ndarray:
    """The molecule at the reference hinge angle, as the simulator renders it."""
    from cryohet.simulate.density import atoms_to_map
    from cryohet.simulate.molecules import atom_coords, atom_weights, centre_of_mass, default_molecule
    from cryohet.simulate.motions import default_hinges

    truth = np.load(d / "body_truth.npz")
    mol = default_molecule()
    xyz, w = atom_coords(mol), atom_weights(mol)
    hinge, _ = default_hinges()["LID"]
    centre = np.mean([centre_of_mass(hinge.apply(xyz, a), w) for a in truth["state_angle_deg"]], axis=0)
    return atoms_to_map(hinge.apply(xyz, float(truth["reference_angle_deg"])), int(truth["box"]),
                        float(truth["apix"]), 6.0, centre_A=centre, weights=w)


def run_relion(d: Path, seed: int) -> tuple[Cost, Cost]:
    """(consensus refine, multi-body refine) costs; outputs in d/relion."""
    r = d / "relion"
    shutil.rmtree(r, ignore_errors=True)
    r.mkdir()
    prep = timed(["relion_reconstruct", "--i", "particles.star", "--o", "relion/reference.mrc", "--ctf"], d,
                 r / "reconstruct.log")
    prep += timed([*MPI, "--i", "particles.star", "--o", "relion/consensus", "--ref", "relion/reference.mrc",
                   "--ini_high", "20", "--auto_refine", "--split_random_halves", "--skip_align",
                   "--auto_iter_max", str(CONSENSUS_ITERATIONS), "--ctf", "--particle_diameter", f"{DIAMETER_A:.0f}",
                   "--flatten_solvent", "--zero_mask", "--sym", "C1", "--healpix_order", "4",
                   "--auto_local_healpix_order", "4", "--offset_range", "3", "--offset_step", "1.5", "--j", "1",
                   "--pool", "30", "--dont_combine_weights_via_disc", "--random_seed", str(seed)], d,
                  r / "consensus.log")
    mb = timed([*MPI, "--continue", f"relion/consensus_it{CONSENSUS_ITERATIONS:03d}_optimiser.star",
                "--o", "relion/mb", "--multibody_masks", "bodies.star", "--solvent_correct_fsc", "--oversampling", "1",
                "--pad", "2", "--healpix_order", "4", "--auto_local_healpix_order", "4", "--offset_range", "3",
                "--offset_step", "1.5", "--reconstruct_subtracted_bodies", "--dont_combine_weights_via_disc",
                "--pool", "30", "--j", "1"], d, r / "multibody.log")
    halves = [read_map(r / f"consensus_it{CONSENSUS_ITERATIONS:03d}_half{h}_class001.mrc") for h in (1, 2)]
    write_map(r / "consensus.mrc", (halves[0][0] + halves[1][0]) / 2, halves[0][1])
    return prep, mb


def relion_rotations(d: Path, frames: np.ndarray) -> np.ndarray:
    """(N, B, 3, 3) RELION's body rotations relative to the consensus, rows in the input STAR's order."""
    star = read_star(d / "relion" / "mb_data.star")
    names = star["particles"]["rlnImageName"].to_numpy()
    where = {name: i for i, name in enumerate(names)}
    order = np.array([where[name] for name in read_star(d / "particles.star")["particles"]["rlnImageName"]])
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    return np.stack([relative_rotation(star[f"images_body_{b + 1}"][cols].to_numpy()[order], frames[b])
                     for b in range(len(frames))], axis=1)


def cryohet_rotations(out: Path, frames: np.ndarray) -> np.ndarray:
    motions = np.load(out / "body_motions.npy").astype(np.float64)
    return np.stack([relative_rotation(motions[:, 6 * b:6 * b + 3], frames[b]) for b in range(len(frames))], axis=1)


def angle_deg(R: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)))


def score(R: np.ndarray, truth: np.lib.npyio.NpzFile, maps: list[np.ndarray], true_vol: np.ndarray,
          masks: list[np.ndarray], apix: float) -> list[dict]:
    rt = truth["relative_rotations"]
    axis = truth["hinge_axis"]
    out = []
    for b in range(R.shape[1]):
        err = angle_deg(np.swapaxes(R[:, b], -1, -2) @ rt[:, b])
        hinge = np.degrees(Rotation.from_matrix(R[:, b]).as_rotvec()) @ axis
        true_hinge = np.degrees(Rotation.from_matrix(rt[:, b]).as_rotvec()) @ axis
        moving = np.std(true_hinge) > 0 and np.std(hinge) > 0
        curve = fsc(maps[b] * masks[b], true_vol * masks[b])
        inside = (masks[b] >= INTERIOR).astype(np.float32)
        out.append({"median_err": float(np.median(err)), "mean_err": float(err.mean()),
                    "hinge_r": float(np.corrcoef(hinge, true_hinge)[0, 1]) if moving else float("nan"),
                    "true_rms": float(np.sqrt(np.mean(angle_deg(rt[:, b]) ** 2))),
                    "fsc_auc": fsc_auc(curve), "res_05": resolution_at(curve, len(curve) * 2 - 2, apix, 0.5),
                    "fsc_auc_interior": fsc_auc(fsc(maps[b] * inside, true_vol * inside))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_multibody"))
    ap.add_argument("--n", type=int, default=1000, help="particles")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--snr", type=float, default=0.5, help="signal variance over noise variance in the particle")
    ap.add_argument("--max_angle_deg", type=float, default=20.0, help="hinge angles drawn from 0 to this")
    ap.add_argument("--threads", type=int, default=2, help="cryohet threads (RELION: 3 MPI processes × 1 thread)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_relion", action="store_true", help="score an earlier RELION run in the same folder")
    args = ap.parse_args()
    d = args.out / f"hinge_n{args.n}_box{args.box}_snr{args.snr:g}"
    if not (d / "body_truth.npz").exists():
        make_data(d, args.n, args.box, args.apix, args.snr, args.max_angle_deg, args.seed)
    timing = d / "relion" / "timing.json"
    if args.skip_relion and timing.exists():
        prep, rel = (Cost(**c) for c in json.loads(timing.read_text()))
    else:
        prep, rel = run_relion(d, args.seed)
        timing.write_text(json.dumps([asdict(prep), asdict(rel)]))
    ours = timed([sys.executable, "-m", "cryohet.cli", "multibody", "--particles", "particles.star", "--map",
                  "relion/consensus.mrc", "--bodies", "bodies.star", "--o", OURS, "--threads", str(args.threads),
                  "--seed", str(args.seed), "--overwrite", "yes"], d, d / "cryohet.log")

    truth = np.load(d / "body_truth.npz")
    bodies = read_bodies(d / "bodies.star", args.box, args.apix)
    masks = [b.mask for b in bodies.bodies]
    true_vol = true_map(d)
    nb = len(masks)
    consensus = read_map(d / "relion" / "consensus.mrc")[0]
    results = {
        "consensus, no body motion (baseline)": (np.tile(np.eye(3), (args.n, nb, 1, 1)), [consensus] * nb, None),
        "RELION 3.1.3 multi-body": (relion_rotations(d, bodies.frames),
                                    [read_map(d / "relion" / f"mb_body{b + 1:03d}.mrc")[0] for b in range(nb)], rel),
        "cryohet `multibody`": (cryohet_rotations(d / OURS, bodies.frames),
                                [read_map(d / OURS / f"body{b + 1:03d}.mrc")[0] for b in range(nb)], ours),
    }
    print(f"\n{args.n} particles, box {args.box}, {args.apix:g} Å/px, SNR {args.snr:g}, "
          f"hinge 0-{args.max_angle_deg:g}°; "
          f"RELION consensus (reconstruct + {CONSENSUS_ITERATIONS} skip-align iterations): {prep.wall_s:.0f} s wall, "
          f"{prep.cpu_s:.0f} s CPU (not in the times below)\n")
    print("| program | body | rotation error to truth, median / mean (deg) | hinge-angle correlation | "
          "body-map FSC AUC to truth | the same, mask interior | FSC 0.5 to truth (Å) | wall (s) | wall / RELION "
          "| CPU (s) | CPU / RELION | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (R, maps, cost) in results.items():  # cost None: the baseline
        for b, s in enumerate(score(R, truth, maps, true_vol, masks, args.apix)):
            r = f"{s['hinge_r']:.2f}" if np.isfinite(s["hinge_r"]) else "–"
            t = (f"{cost.wall_s:.0f} | {cost.wall_s / rel.wall_s:.2f} | {cost.cpu_s:.0f} "
                 f"| {cost.cpu_s / rel.cpu_s:.2f} | {cost.peak_gb:.2f}") if cost else "– | – | – | – | –"
            print(f"| {name} | {b + 1} (true rms {s['true_rms']:.1f}°) | {s['median_err']:.1f} / {s['mean_err']:.1f} "
                  f"| {r} | {s['fsc_auc']:.3f} | {s['fsc_auc_interior']:.3f} | {s['res_05']:.1f} | {t} |")


if __name__ == "__main__":
    main()
