"""cryohet as a RELION External job, driven by RELION 3.1's own relion_pipeliner (Debian package).

A project folder gets a default_pipeline.star; External jobs are added and run with relion_pipeliner
exactly as the GUI would run them (from the project folder, in the background, output in run.out and
run.err). RELION's own relion_reconstruct then reads the particles STAR files cryohet wrote.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryohet.reconstruct.fsc import fsc
from cryohet.record import read_record
from cryohet.relion_external import (
    ABORT_NOW,
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_SUCCESS,
    OUTPUT_NODES,
    main,
    parse_job_args,
)

EXE = str(Path(sys.executable).with_name("cryohet_external"))
SIMULATE = {"method": "simulate", "n_particles": "200", "box": "32", "apix": "3", "n_states": "2",
            "resolution_A": "8", "snr": "1"}
PROC_FINISHED, PROC_FAILED, PROC_ABORTED = 2, 3, 4  # RELION 3.1 process status codes

#: jobs whose method runs long: make test runs them with the newest versions only (tests/conftest.py, one_stack);
#: the light jobs exercise the same External-job code in both environments
LONG_JOB = pytest.mark.one_stack("current")


def _env() -> dict[str, str]:
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _pipeliner(project: Path, *args: str, background: bool = False):
    cmd = ["relion_pipeliner", *args]
    if background:
        return subprocess.Popen(cmd, cwd=project, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    return out


def _add_external(project: Path, params: dict[str, str], inputs: dict[str, str] | None = None,
                  other: str = "") -> str:
    """Add an External job with RELION's job options; return its folder (External/jobNNN/)."""
    opts = [f"fn_exe == {EXE}", "nr_threads == 2"]
    opts += [f"{k} == {v}" for k, v in (inputs or {}).items()]
    for i, (label, value) in enumerate(params.items(), start=1):
        opts += [f"param{i}_label == {label}", f"param{i}_value == {value}"]
    if other:
        opts.append(f"other_args == {other}")
    counter = _pipeline_table(project, "pipeline_general")
    job = f"External/job{int(counter[0][0]):03d}/"
    _pipeliner(project, "--addJob", "External", "--addJobOptions", ";".join(opts))
    return job


def _run_job(project: Path, job: str) -> None:
    _pipeliner(project, "--RunJobs", f"{job} ", "--sec_wait_after", "1")  # the trailing space matters


def _pipeline_table(project: Path, name: str) -> list[list[str]]:
    """Rows of one table of default_pipeline.star (loop or key/value)."""
    lines = (project / "default_pipeline.star").read_text().splitlines()
    start = lines.index(f"data_{name}")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("data_"):
            break
        s = line.strip()
        if not s or s.startswith(("#", "loop_")) or (s.startswith("_") and name != "pipeline_general"):
            continue
        rows.append(s.split()[1:] if name == "pipeline_general" else s.split())
    return rows


def _status(project: Path, job: str) -> int:
    return {r[0]: int(r[3]) for r in _pipeline_table(project, "pipeline_processes")}[job]


def _nodes(project: Path) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in _pipeline_table(project, "pipeline_nodes")}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("relion_project")
    (proj / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n")
    return proj


@pytest.fixture(scope="module")
def simulated_job(project) -> str:
    job = _add_external(project, SIMULATE)
    _run_job(project, job)
    return job


def _relion_reconstruct(project: Path, star: str, out: str, *extra: str) -> np.ndarray:
    subprocess.run(["relion_reconstruct", "--i", star, "--o", out, "--ctf", *extra], cwd=project, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=300)
    with mrcfile.open(project / out) as m:
        return m.data.copy()


def test_simulate_job_nodes_finished_and_relion_reconstructs(project, simulated_job):
    job = simulated_job
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    assert _status(project, job) == PROC_FINISHED
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}maps/mean.mrc"] == 6
    assert sum(1 for n in nodes if n.startswith(f"{job}maps/state_")) == 2
    labels = (project / job / OUTPUT_NODES).read_text()
    assert "ParticleGroupMetadata.star.relion" in labels and "DensityMap.mrc" in labels
    # the job's log went to run.out, nothing alarming to run.err
    assert "cryohet simulate" in (project / job / "run.out").read_text()
    assert "error" not in (project / job / "run.err").read_text().lower()
    # RELION's own program reads the particles STAR (image paths relative to the project, as RELION expects)
    vol = _relion_reconstruct(project, f"{job}particles.star", "sim_rec.mrc")
    assert vol.shape == (32, 32, 32)
    with mrcfile.open(project / job / "maps/mean.mrc") as m:
        truth = m.data
    assert np.corrcoef(vol.ravel(), truth.ravel())[0, 1] > 0.5


def test_reconstruct_job_on_relion_particles(project, simulated_job):
    job = _add_external(project, {"method": "reconstruct", "wiener": "auto"},
                        inputs={"in_part": f"{simulated_job}particles.star"}, other="--batch_size 64")
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    assert _status(project, job) == PROC_FINISHED
    nodes = _nodes(project)
    assert nodes[f"{job}map.mrc"] == 6
    assert nodes[f"{job}half1.mrc"] == 10 and nodes[f"{job}half2.mrc"] == 10
    assert nodes[f"{job}particles.star"] == 3
    record = read_record(project / job)
    assert record.params["batch_size"] == 64 and record.params["threads"] == 2
    # RELION reconstructs one half-set from the particles STAR the job re-emitted (rlnRandomSubset kept)
    half = _relion_reconstruct(project, f"{job}particles.star", "half1_relion.mrc", "--subset", "1")
    with mrcfile.open(project / job / "half1.mrc") as m:
        ours = m.data
    assert np.corrcoef(half.ravel(), ours.ravel())[0, 1] > 0.5


def test_job_runs_in_the_environment_of_cryohet_python(project, simulated_job, monkeypatch):
    """CRYOHET_PYTHON (the Scipion plugin's variable) chooses the environment the job runs the engine in: here the
    README's other environment (numpy 2.x from the Scipion-pinned one, numpy 1.26 from the newest one)."""
    here = Path(sys.executable).parents[1]
    other = here.with_name(".venv" if here.name == ".venv-current" else ".venv-current") / "bin" / "python"
    assert other.is_file(), f"{other}: missing (make setup setup-current builds both environments)"
    monkeypatch.setenv("CRYOHET_PYTHON", str(other))
    job = _add_external(project, {"method": "reconstruct"}, inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    assert _nodes(project)[f"{job}map.mrc"] == 6
    other_numpy = subprocess.run([str(other), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    assert read_record(project / job).versions["numpy"] == other_numpy != np.__version__


def test_cryohet_python_that_cannot_run_fails_the_job_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOHET_PYTHON", str(tmp_path / "no" / "python"))
    job = tmp_path / "External" / "job009"
    assert main(["--o", str(job), "--method", "reconstruct"]) == 2
    assert (job / EXIT_FAILURE).exists()
    assert f"CRYOHET_PYTHON={tmp_path / 'no' / 'python'} cannot run" in (job / "run.err").read_text()


def test_classify_job_registers_classes_as_nodes(project, simulated_job):
    """classify from RELION's External job: particles with rlnClassNumber, one STAR per class, class maps and
    half-maps as nodes RELION's next jobs take; relion_star_handler reads the classes back."""
    job = _add_external(project, {"method": "classify", "K": "2", "iterations": "3"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}class001.mrc"] == 6 and nodes[f"{job}class002.mrc"] == 6
    assert nodes[f"{job}class001_half1.mrc"] == 10
    per_class = [n for n in nodes if n.startswith(f"{job}particles_class")]
    assert per_class and all(nodes[n] == 3 for n in per_class)
    subprocess.run(["relion_star_handler", "--i", f"{job}particles.star", "--o", f"{job}c1.star", "--select",
                    "rlnClassNumber", "--minval", "1", "--maxval", "1"], cwd=project, env=_env(), check=True,
                   capture_output=True, timeout=120)
    ours = (project / job / "particles_class001.star").read_text().count("@")
    theirs = (project / job / "c1.star").read_text().count("@")
    assert ours == theirs > 0


@LONG_JOB
def test_abinit_job_registers_posed_particles_and_map(project, simulated_job):
    """abinit from RELION's External job: its particles STAR (poses found, RELION's conventions) and map with
    half-maps are nodes of the types RELION's next jobs take, and relion_reconstruct of the particles, run from
    the project folder as RELION runs it, gives our map (FSC above 0.9 to 24 Å and 0.5 to 16 Å after 4 short
    iterations, measured 0.93 and 0.65; a wrong convention would not reach 0.5 at 24 Å)."""
    from cryohet.reconstruct.fsc import fsc

    job = _add_external(project, {"method": "abinit", "global_iterations": "3", "local_iterations": "1",
                                  "global_subset": "100"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3 and nodes[f"{job}map.mrc"] == 6
    assert nodes[f"{job}half1.mrc"] == 10 and nodes[f"{job}half2.mrc"] == 10
    theirs = _relion_reconstruct(project, f"{job}particles.star", f"{job}relion.mrc")
    with mrcfile.open(project / job / "map.mrc") as m:
        ours = m.data.copy()
    curve = fsc(ours, theirs)  # ours is Wiener-filtered, RELION's is not: they differ where the signal is weak
    assert curve[1:5].min() > 0.9 and curve[1:7].min() > 0.5  # to 24 Å and to 16 Å


def test_kernel_volumes_job_on_relion_particles_with_latents(project, simulated_job):
    """kernel-volumes from RELION's External job: the particles from the input node, latents from a file (the
    simulator's true states); maps, half-maps, local-resolution maps and the particles STAR are nodes of the
    types RELION takes, and a map of the state's particles alone by relion_reconstruct agrees with the state's
    kernel map at low resolution (FSC above 0.8 to 1/12 Å⁻¹)."""
    from cryohet.reconstruct.fsc import fsc

    table = starfile.read(project / simulated_job / "particles.star")["particles"]
    state = table["cryohetTrueState"].to_numpy()
    np.save(project / "states.npy", state.astype(np.float32)[:, None])
    (project / "points.txt").write_text("0\n1\n")  # (--z 0;1 cannot pass: the pipeliner splits options at ';')
    job = _add_external(project, {"method": "kernel-volumes", "latents": "states.npy", "z_file": "points.txt",
                                  "min_particles": "25", "n_levels": "3"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}maps/kernel_000.mrc"] == 6 and nodes[f"{job}maps/kernel_001.mrc"] == 6
    assert nodes[f"{job}maps/kernel_001_half2.mrc"] == 10 and nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}maps/kernel_001_locres.mrc"] == 12  # RELION 3.1's local-resolution (resmap) node
    subset = table[state == 1]
    starfile.write({"optics": starfile.read(project / simulated_job / "particles.star")["optics"],
                    "particles": subset}, project / "state1.star", overwrite=True)
    theirs = _relion_reconstruct(project, "state1.star", "state1.mrc")
    with mrcfile.open(project / job / "maps" / "kernel_001.mrc") as m:
        ours = m.data.copy()
    curve = fsc(ours, theirs)
    apix = float(SIMULATE["apix"])
    shells = int(len(ours) * apix / 12.0)
    assert curve[1:shells + 1].min() > 0.8, curve


def test_landscape_job_registers_path_subsets(project, simulated_job):
    """landscape from RELION's External job on latents from a file: the particles with their free energy and the
    subsets along the path between the two states are particle nodes that point at the original images."""
    table = starfile.read(project / simulated_job / "particles.star")["particles"]
    z = table["cryohetTrueState"].to_numpy().astype(np.float32)[:, None]
    np.save(project / "noisy_states.npy", z + np.random.default_rng(0).normal(0, 0.1, z.shape).astype(np.float32))
    job = _add_external(project, {"method": "landscape", "latents": "noisy_states.npy", "bootstrap": "2",
                                  "path_points": "3", "path_maps": "no"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    subsets = [n for n in nodes if n.startswith(f"{job}particles_path_")]
    assert nodes[f"{job}particles.star"] == 3 and len(subsets) >= 2 and all(nodes[n] == 3 for n in subsets)
    ours = starfile.read(project / job / "particles.star")["particles"]
    assert "cryohetFreeEnergy" in ours and set(ours["rlnImageName"]) == set(table["rlnImageName"])


@LONG_JOB
def test_manifold_images_job_registers_coordinate_particles_and_maps(project, simulated_job):
    """manifold-images from RELION's External job: the particles with their coordinate and the maps along it are
    nodes RELION takes; the coordinate separates the two simulated states (|Spearman| 0.84 measured, 0.77 before
    refinement)."""
    from scipy.stats import spearmanr

    job = _add_external(project, {"method": "manifold-images", "per_direction": "50", "min_per_direction": "25",
                                  "refine_rounds": "1", "n_frames": "2", "min_particles": "40", "bootstrap": "2"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}maps/frame_000.mrc"] == 6 and nodes[f"{job}maps/frame_001.mrc"] == 6
    ours = starfile.read(project / job / "particles.star")["particles"]
    assert abs(spearmanr(ours["cryohetManifoldCoordinate"], ours["cryohetTrueState"]).correlation) > 0.6


@LONG_JOB
def test_manifold_volumes_job_registers_states(project, simulated_job):
    """manifold-volumes from RELION's External job on the latents of a principal-volumes job: the particles with
    their state and coordinate, each state's particles and map (with half-maps) are nodes RELION takes; the states
    follow the simulated ones (adjusted Rand 0.98 measured)."""
    from sklearn.metrics import adjusted_rand_score

    pv = _add_external(project, {"method": "principal-volumes", "n_components": "2", "max_iter": "5"},
                       inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, pv)
    assert (project / pv / EXIT_SUCCESS).exists(), (project / pv / "run.err").read_text()
    job = _add_external(project, {"method": "manifold-volumes", "run": pv.rstrip("/"), "n_volumes": "8",
                                  "n_states": "2", "resolution_A": "20", "box": "16"})
    _run_job(project, job)
    assert (project / job / EXIT_SUCCESS).exists(), (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}particles_state_000.star"] == 3 and nodes[f"{job}states/state_000.mrc"] == 6
    assert nodes[f"{job}states/state_001_half1.mrc"] == 10
    ours = starfile.read(project / job / "particles.star")["particles"]
    assert set(ours["rlnClassNumber"]) == {1, 2}
    assert adjusted_rand_score(ours["cryohetTrueState"], ours["rlnClassNumber"]) > 0.5


def test_multibody_and_flex_analyse_jobs(project, monkeypatch):
    """multibody (particles, consensus map and the bodies STAR from RELION's tab) then flex-analyse on its job
    folder: body maps, half-maps and masks, the particles and a component-range subset as nodes."""
    from cryohet.simulate.bodies import simulate_two_bodies

    monkeypatch.chdir(project)  # image and mask paths relative to the project folder, as RELION names them
    data = simulate_two_bodies(project / "TwoBody", n_particles=120, box=32, apix=3.0, snr=5.0, image_paths="cwd")
    mb = _add_external(project, {"method": "multibody", "bodies": "TwoBody/bodies.star", "iterations": "1",
                                 "resolution_A": "9"},
                       inputs={"in_part": "TwoBody/particles.star",
                               "in_3dref": str(data.mean_map.relative_to(project))})
    _run_job(project, mb)
    assert (project / mb / EXIT_SUCCESS).exists(), (project / mb / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{mb}body001.mrc"] == 6 and nodes[f"{mb}body002.mrc"] == 6
    assert nodes[f"{mb}body002_half1.mrc"] == 10 and nodes[f"{mb}body002_mask.mrc"] == 7
    assert nodes[f"{mb}particles.star"] == 3
    fa = _add_external(project, {"method": "flex-analyse", "run": mb, "relative_to": "1", "components": "1",
                                 "maps_per_component": "3", "select_component": "1", "select_min": "0"})
    _run_job(project, fa)
    assert (project / fa / EXIT_SUCCESS).exists(), (project / fa / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{fa}particles_selected.star"] == 3
    maps = [n for n in nodes if n.startswith(fa) and n.endswith(".mrc")]
    assert len(maps) == 3 and all(nodes[n] == 6 for n in maps)
    z = np.load(project / fa / "components.npy")
    kept = (project / fa / "particles_selected.star").read_text().count("@")
    assert kept == int((z[:, 0] >= 0).sum()) > 0


def test_nma_job_takes_the_atomic_model_as_a_parameter(project):
    """RELION 3.1's External job has no atomic-model input: the model is a parameter (a path), and the mode maps are
    its map nodes; the models themselves stay files (3.1 has no node type for them; RELION 5's jobs register them)."""
    model = Path(__file__).resolve().parents[1] / "cryohet" / "data" / "default_molecule.pdb"
    job = _add_external(project, {"method": "nma", "model": str(model), "n_modes": "4", "movie_modes": "1",
                                  "n_frames": "3"})
    _run_job(project, job)
    assert _status(project, job) == PROC_FINISHED, (project / job / "run.err").read_text()
    nodes = _nodes(project)
    maps = sorted(n for n in nodes if n.startswith(f"{job}mode_01_maps/"))
    assert len(maps) == 3 and all(nodes[n] == 6 for n in maps)
    assert not [n for n in nodes if n.startswith(job) and n.endswith(".pdb")]
    assert "AtomCoords" not in (project / job / OUTPUT_NODES).read_text()
    record = read_record(project / job)
    assert record.params["model"] == str(model) and record.params["n_modes"] == 4
    with np.load(project / job / "modes.npz", allow_pickle=False) as f:
        assert f["modes"].shape == (4, 214, 3)


def test_fit_modes_job_on_an_nma_job(project, simulated_job):
    """fit-modes takes the particles as its input node and the nma job's folder as the value of its `modes`
    parameter; its particles (with the amplitudes) are a particles node that RELION reads."""
    from cryohet.io.atomic_model import read_atoms, write_models
    from cryohet.simulate.modes import place_in_box

    atoms = place_in_box(read_atoms(Path(__file__).resolve().parents[1] / "cryohet" / "data" /
                                    "default_molecule.pdb", "heavy"), 32, 3.0)
    write_models(project / "placed.pdb", atoms, atoms.xyz_A[None])
    nma = _add_external(project, {"method": "nma", "model": "placed.pdb", "n_modes": "2", "movie_modes": "0"})
    _run_job(project, nma)
    assert _status(project, nma) == PROC_FINISHED, (project / nma / "run.err").read_text()
    job = _add_external(project, {"method": "fit-modes", "modes": nma, "modes_used": "1-2", "iterations": "5"},
                        inputs={"in_part": f"{simulated_job}particles.star"})
    _run_job(project, job)
    assert _status(project, job) == PROC_FINISHED, (project / job / "run.err").read_text()
    assert _nodes(project)[f"{job}particles.star"] == 3
    star = starfile.read(project / job / "particles.star")["particles"]
    amplitudes = np.load(project / job / "amplitudes.npy")
    np.testing.assert_allclose(star[["cryohetZ1", "cryohetZ2"]].to_numpy(), amplitudes, rtol=1e-5, atol=1e-6)
    vol = _relion_reconstruct(project, f"{job}particles.star", "fit_modes_rec.mrc")
    assert vol.shape == (32, 32, 32) and np.isfinite(vol).all()


@LONG_JOB
def test_train_deform_and_reconstruct_deformed_jobs(project, simulated_job):
    """train-deform takes RELION's own reconstruction of the particles as its consensus (the 3-D reference input);
    reconstruct-deformed takes that job's folder as its run: corrected and homogeneous maps and half-maps are map
    nodes, and its homogeneous map is relion_reconstruct's of the same particles."""
    particles = f"{simulated_job}particles.star"
    consensus = _relion_reconstruct(project, particles, "deform_consensus.mrc")
    job = _add_external(project, {"method": "train-deform", "field": "flow", "zdim": "2", "epochs": "2",
                                  "n_maps": "3", "n_clusters": "0"},
                        inputs={"in_part": particles, "in_3dref": "deform_consensus.mrc"})
    _run_job(project, job)
    assert _status(project, job) == PROC_FINISHED, (project / job / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{job}particles.star"] == 3 and nodes[f"{job}canonical_map.mrc"] == 6
    assert len([n for n in nodes if n.startswith(f"{job}pc1/")]) == 3
    rd = _add_external(project, {"method": "reconstruct-deformed", "run": job})
    _run_job(project, rd)
    assert _status(project, rd) == PROC_FINISHED, (project / rd / "run.err").read_text()
    nodes = _nodes(project)
    assert nodes[f"{rd}map.mrc"] == 6 and nodes[f"{rd}homogeneous.mrc"] == 6
    assert nodes[f"{rd}half1.mrc"] == 10 and nodes[f"{rd}homogeneous_half2.mrc"] == 10
    with mrcfile.open(project / rd / "homogeneous.mrc") as m:
        ours = torch.as_tensor(m.data.astype(np.float32))
    curve = fsc(ours, torch.as_tensor(consensus.astype(np.float32)))
    assert curve[1:int(32 * 3.0 / 16.0) + 1].min() > 0.9  # the same map to 16 Å


def test_bad_input_fails_with_reason_in_run_err(project, simulated_job):
    """A particles STAR without CTF columns: RELION_JOB_EXIT_FAILURE, status failed, the reason in run.err."""
    src = (project / simulated_job / "particles.star").read_text().splitlines()
    cols = [line.split()[0] for line in src if line.startswith("_rln") and "Defocus" in line]
    assert cols
    bad = project / "no_ctf.star"
    body, header_cols, keep = [], [], []
    in_particles = False
    for line in src:
        if line.startswith("data_particles"):
            in_particles = True
        if in_particles and line.startswith("_"):
            header_cols.append(line.split()[0])
            if line.split()[0] in cols:
                continue
        elif in_particles and line.strip() and not line.startswith(("loop_", "#", "data_")):
            keep = [i for i, c in enumerate(header_cols) if c not in cols]
            words = line.split()
            line = " ".join(words[i] for i in keep)
        body.append(line)
    bad.write_text("\n".join(body) + "\n")
    job = _add_external(project, {"method": "reconstruct"}, inputs={"in_part": "no_ctf.star"})
    _run_job(project, job)
    assert (project / job / EXIT_FAILURE).exists()
    assert not (project / job / EXIT_SUCCESS).exists()
    assert _status(project, job) == PROC_FAILED
    err = (project / job / "run.err").read_text()
    assert "no_ctf.star" in err and "defocus" in err.lower(), err


def test_unknown_parameter_fails_with_reason(project, simulated_job):
    job = _add_external(project, {"method": "reconstruct", "lowpas_A": "8"},
                        inputs={"in_part": f"{simulated_job}particles.star"})  # (a missing input stalls RELION)
    _run_job(project, job)
    assert _status(project, job) == PROC_FAILED
    err = (project / job / "run.err").read_text()
    assert "unknown option --lowpas_A" in err and "wiener" in err, err


def test_abort_now_stops_the_running_job(project):
    """The GUI's abort: RELION_JOB_ABORT_NOW appears while the job runs -> RELION_JOB_EXIT_ABORTED."""
    params = dict(SIMULATE, n_states="200", n_particles="2000")
    job = _add_external(project, params)
    proc = _pipeliner(project, "--RunJobs", f"{job} ", "--sec_wait_after", "1", background=True)
    run_out = project / job / "run.out"
    deadline = time.time() + 120
    while time.time() < deadline and "parameters:" not in (run_out.read_text() if run_out.exists() else ""):
        time.sleep(0.2)
    (project / job / ABORT_NOW).touch()
    proc.wait(timeout=180)
    assert (project / job / EXIT_ABORTED).exists(), (project / job / "run.err").read_text()
    assert not (project / job / EXIT_SUCCESS).exists()
    assert _status(project, job) == PROC_ABORTED
    assert read_record(project / job).status == "aborted"


def test_abort_file_present_at_start_in_process(tmp_path, monkeypatch):
    """Same protocol when run by hand: the runner raises RunAborted at its first step."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "External" / "job009"
    job.mkdir(parents=True)
    (job / ABORT_NOW).touch()
    args = ["--o", "External/job009/", "--method", "simulate", "--n_particles", "50", "--box", "32",
            "--n_states", "3", "--j", "1"]
    assert main(args) == 3
    assert (job / EXIT_ABORTED).exists() and not (job / EXIT_SUCCESS).exists()
    assert read_record(job).status == "aborted"
    assert "abort" in (job / "run.err").read_text()
    assert "CRYOHET_ABORT_FILE" not in os.environ


def test_running_a_job_again_replaces_it_unless_overwrite_no(tmp_path, monkeypatch):
    """RELION runs a job again into its own folder (continue, overwrite): the earlier run is replaced; with the
    pair overwrite = no the job fails, with the engine's reason in run.err."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "External" / "job010"
    job.mkdir(parents=True)
    (job / "note.txt").write_text("RELION's note of the job\n")  # RELION writes into the folder first
    args = ["--o", "External/job010/", "--method", "simulate", "--n_particles", "20", "--box", "16",
            "--n_states", "2", "--j", "1"]
    assert main(args) == 0
    first = read_record(job)
    assert first.params["overwrite"] is True and first.status == "finished"
    assert main(args) == 0 and read_record(job).started > first.started and (job / EXIT_SUCCESS).exists()
    assert main([*args, "--overwrite", "no"]) == 2
    assert (job / EXIT_FAILURE).exists() and not (job / EXIT_SUCCESS).exists()
    err = (job / "run.err").read_text()
    assert "earlier cryohet simulate run (finished" in err and "--overwrite yes" in err, err
    assert read_record(job).status == "finished"  # the refused run left the earlier record alone


def test_parse_what_relion_passes():
    args = parse_job_args(["--o", "External/job003/", "--in_parts", "Select/job002/particles.star",
                           "--method", "reconstruct", "--wiener", "0.5", "--box", "24", "--j", "4",
                           "--pipeline_control", "External/job003/", "--datadir", "/data/my", "stacks"])
    assert args.out == "External/job003/" and args.method == "reconstruct" and args.threads == "4"
    assert args.inputs == {"particles": "Select/job002/particles.star"}
    assert args.values == {"wiener": "0.5", "box": "24", "datadir": "/data/my stacks"}


def test_list_params_prints_the_external_job_tab(capsys):
    assert main(["--list-params", "reconstruct"]) == 0
    out = capsys.readouterr().out
    assert "Param1   method             = reconstruct" in out
    assert "Input particles:" in out and "--particles" in out
    assert "wiener" in out and "batch_size" in out


def test_no_output_dir_is_a_usage_error(capsys):
    assert main(["--method", "reconstruct"]) == 2
    assert "--o" in capsys.readouterr().err


@pytest.fixture(scope="module", autouse=True)
def _relion_available():
    if shutil.which("relion_pipeliner") is None:
        pytest.fail("RELION 3.1 (relion_pipeliner) is not installed: apt-get install relion (see shared/docs/HOSTS.md)")
