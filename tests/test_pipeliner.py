"""RELION 5's job runner, the CCP-EM pipeliner (ccpem-pipeliner from PyPI), runs every cryohet method as a job type.

A real pipeliner project is made in a temporary folder and jobs are run through its API as RELION 5's GUI runs
them: nodes with RELION 5's types in default_pipeline.star, the job's results displays, chained cryohet jobs run
as a schedule, failures with the engine's reason, the GUI's abort. The pipeliner needs numpy 2, so these tests
run in the newest environment only (make test).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from pipeliner.api.manage_project import PipelinerProject
from pipeliner.job_factory import UnavailableJob, get_job_types, new_job_of_type
from pipeliner.project_graph import ProjectGraph

from cryohet.methods import all_methods, method_modules, method_of
from cryohet.record import read_record

SIMULATE = {"n_particles": "200", "box": "32", "apix": "3", "n_states": "2", "resolution_A": "8", "snr": "1"}


def _run(project: PipelinerProject, job_type: str, options: dict[str, str]):
    return project.run_job({"_rlnJobTypeLabel": job_type, **options}, run_in_foreground=True)


def _nodes() -> dict[str, str]:
    """Node name -> RELION 5 type label, from the project's default_pipeline.star."""
    with ProjectGraph(read_only=True) as graph:
        return {n.name: n.toplevel_type + "." + ".".join([n.format, *n.kwds]) for n in graph.node_list}


def _status(job_dir: str) -> str:
    with ProjectGraph(read_only=True) as graph:
        return graph.find_process(job_dir).status


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A new pipeliner project with a simulate job (the input of the others)."""
    folder = tmp_path_factory.mktemp("relion5_project")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    mp.setenv("CRYOHET_NO_PROGRESS", "1")
    project = PipelinerProject(make_new_project=True)
    sim = _run(project, "cryohet.simulate", SIMULATE)
    yield project, sim.output_dir
    mp.undo()


def test_every_method_is_a_job_type():
    """The entry points (setup.py, one per module of cryohet/methods) give one loadable job type per method, with a
    job option per parameter (inputs as input nodes, expert ones in the Expert group)."""
    jobs = {j.PROCESS_NAME: j for j in get_job_types("cryohet.")}
    assert not [n for n, j in jobs.items() if isinstance(j, UnavailableJob)], jobs
    modules = [m for m in method_modules() if method_of(m) is not None]
    assert set(jobs) == {f"cryohet.{m}" for m in modules} and len(jobs) == len(all_methods())
    rec = jobs["cryohet.reconstruct"]
    assert type(rec.joboptions["particles"]).__name__ == "InputNodeJobOption"
    assert rec.joboptions["particles"].is_required and rec.joboptions["particles"].node_type == "ParticleGroupMetadata"
    assert type(rec.joboptions["mask"]).__name__ == "InputNodeJobOption"
    run = jobs["cryohet.eval_volume"].joboptions["run"]  # an earlier run: its record's node
    assert type(run).__name__ == "InputNodeJobOption" and (run.node_type, run.node_kwds) == ("ProcessData",
                                                                                            ["cryohet", "run"])
    assert rec.joboptions["batch_size"].jobop_group == "Expert" and rec.joboptions["box"].jobop_group == "Main"
    assert "threads" not in rec.joboptions and "nr_threads" in rec.joboptions  # the Running tab's threads
    sim = jobs["cryohet.simulate"]
    assert type(sim.joboptions["motion"]).__name__ == "MultipleChoiceJobOption"
    assert sim.joboptions["n_particles"].hard_min == 1
    assert sim.jobinfo.references and all(r.year for r in sim.jobinfo.references)


def test_simulate_then_reconstruct_in_a_relion5_project(project):
    project, sim_dir = project
    assert _status(sim_dir) == "Succeeded"
    rec = _run(project, "cryohet.reconstruct", {"particles": f"{sim_dir}particles.star", "nr_threads": "2"})
    job = rec.output_dir
    assert _status(job) == "Succeeded", Path(job, "run.err").read_text()
    nodes = _nodes()
    assert nodes[f"{sim_dir}particles.star"] == "ParticleGroupMetadata.star.relion"
    assert nodes[f"{sim_dir}maps/mean.mrc"] == "DensityMap.mrc"
    assert nodes[f"{job}map.mrc"] == "DensityMap.mrc"
    assert nodes[f"{job}half1.mrc"] == nodes[f"{job}half2.mrc"] == "DensityMap.mrc.halfmap"
    assert nodes[f"{job}particles.star"] == "ParticleGroupMetadata.star.relion"
    assert nodes[f"{job}cryohet_run.json"] == "ProcessData.json.cryohet.run"
    assert all(Path(n).is_file() for n in nodes)
    # the engine's log in run.out, as RELION's programs do; run.err only for errors
    assert "INFO output volume" in Path(job, "run.out").read_text() and Path(job, "run.err").read_text() == ""
    with ProjectGraph(read_only=True) as graph:  # the edge from the simulated particles to this job
        assert [n.name for n in graph.find_process(job).input_nodes] == [f"{sim_dir}particles.star"]
    record = read_record(Path(job))
    assert record.params["threads"] == 2 and record.params["overwrite"] is True
    assert read_record(Path(sim_dir)).params["image_paths"] == "cwd"  # RELION's convention: paths from the project
    with mrcfile.open(f"{job}map.mrc") as m, mrcfile.open(f"{sim_dir}maps/mean.mrc") as t:
        assert np.corrcoef(m.data.ravel(), t.data.ravel())[0, 1] > 0.8

    # What the GUI's results tab shows: map slices, a 3-D view, the FSC plot, the outputs
    shown = {(o.dobj_type, o.title) for o in project.get_job(job).save_results_display_files()}
    kinds = {k for k, _ in shown}
    assert {"montage", "mapmodel", "image", "text"} <= kinds and "pending" not in kinds, shown
    assert any(t == "FSC curve" for k, t in shown if k == "image")
    saved = sorted(Path(job).glob(".results_display*.json"))
    assert len(saved) == len(shown) and json.loads(saved[0].read_text())["dobj_type"] == "montage"


def test_a_job_on_an_earlier_cryohet_job(project):
    """principal-volumes, and kernel-volumes on its run (the input node of its run record, a negative latent
    value as one argument), both scheduled before either runs, then run as a schedule: the graph's edge, the maps
    with half-maps and local resolution as RELION 5's nodes, and the displays (the report as text, the maps' slices
    and 3-D views, at most 24 and 3 of them)."""
    project, sim_dir = project
    pv = project.schedule_job({"_rlnJobTypeLabel": "cryohet.principal_volumes", "n_components": "2",
                               "max_iter": "5", "particles": f"{sim_dir}particles.star"}).output_dir
    kv = project.schedule_job({"_rlnJobTypeLabel": "cryohet.kernel_volumes", "run": f"{pv}cryohet_run.json",
                               "z": "-0.5,0"}).output_dir
    project.run_schedule("chain", [pv, kv], seconds_wait_after=0)
    assert _status(pv) == "Succeeded", Path(pv, "run.err").read_text()
    assert _status(kv) == "Succeeded", Path(kv, "run.err").read_text()
    params = read_record(Path(kv)).params
    assert params["run"] == pv.rstrip("/") and params["z"] == "-0.5,0"  # the engine was given the run's folder
    with ProjectGraph(read_only=True) as graph:  # the record: pv's output (declared before the run), kv's input
        assert f"{pv}cryohet_run.json" in [n.name for n in graph.find_process(pv).output_nodes]
        assert [n.name for n in graph.find_process(kv).input_nodes] == [f"{pv}cryohet_run.json"]
    nodes = _nodes()
    assert nodes[f"{pv}cryohet_run.json"] == "ProcessData.json.cryohet.run"
    assert nodes[f"{kv}maps/kernel_000.mrc"] == "DensityMap.mrc"
    assert nodes[f"{kv}maps/kernel_000_half1.mrc"] == "DensityMap.mrc.halfmap"
    assert nodes[f"{kv}maps/kernel_000_locres.mrc"] == "Image3D.mrc.localresmap"

    shown = project.get_job(pv).save_results_display_files()
    kinds = [o.dobj_type for o in shown]
    assert "pending" not in kinds and "textfile" in kinds and kinds.count("mapmodel") == 3, kinds
    montage = next(o for o in shown if o.dobj_type == "montage")
    assert len(montage.labels) == 3 * 24  # three slices of each of the first 24 maps of the 2 + 22 the run made


def test_nma_job_has_an_atomic_model_input_node_and_registers_models(project):
    """The atomic model is an AtomCoords input node; the job's models are AtomCoords nodes, its mode maps
    DensityMap nodes."""
    project, _ = project
    model = Path("Import/model.pdb")
    model.parent.mkdir(exist_ok=True)
    model.write_bytes((Path(__file__).resolve().parents[1] / "cryohet" / "data" / "default_molecule.pdb").read_bytes())
    option = new_job_of_type("cryohet.nma").joboptions["model"]
    assert type(option).__name__ == "InputNodeJobOption" and option.node_type == "AtomCoords"
    job = _run(project, "cryohet.nma", {"model": str(model), "n_modes": "3", "movie_modes": "1", "n_frames": "3",
                                        "nr_threads": "1"}).output_dir
    assert _status(job) == "Succeeded", Path(job, "run.err").read_text()
    nodes = _nodes()
    assert nodes[f"{job}atoms.pdb"] == nodes[f"{job}mode_01.pdb"] == "AtomCoords.pdb"
    assert sum(1 for n, t in nodes.items() if n.startswith(f"{job}mode_01_maps/") and t == "DensityMap.mrc") == 3
    with ProjectGraph(read_only=True) as graph:
        assert [n.name for n in graph.find_process(job).input_nodes] == [str(model)]


def test_abort_stops_the_engine(project):
    """The GUI's Abort (the pipeliner's abort trigger, then SIGTERM to the command) stops a long run at once: the job
    is aborted, the run record says so and run.err has the reason."""
    project, sim_dir = project
    job = project.run_job({"_rlnJobTypeLabel": "cryohet.train_vae", "particles": f"{sim_dir}particles.star",
                           "epochs": "1000"}).output_dir  # in the background, as the GUI runs jobs
    record = Path(job, "cryohet_run.json")
    deadline = time.monotonic() + 60
    while not (record.is_file() and read_record(Path(job)).status == "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        project.abort_job(job)
        assert project.wait_for_job_to_finish(job, ping=0.2, timeout=60) == "Aborted"
    finally:  # never leave the run behind
        if record.is_file() and read_record(Path(job)).status == "running":
            with contextlib.suppress(ProcessLookupError):
                os.kill(read_record(Path(job)).pid, signal.SIGKILL)
    assert read_record(Path(job)).status == "aborted"
    assert "cryohet train-vae: stopped by SIGTERM" in Path(job, "run.err").read_text()


def test_pdf_and_json_outputs_are_shown(tmp_path, monkeypatch):
    """Outputs the runs above do not make, in a record as a run writes it: a PDF plot (a LogFile.pdf node, shown
    as a PDF) and a JSON report (shown as JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryohet.record import RunRecord

    monkeypatch.chdir(tmp_path)
    job_dir = Path("Cryohet/job009")
    job_dir.mkdir(parents=True)
    plt.plot([0, 1], [1, 0])
    plt.savefig(job_dir / "curve.pdf")
    plt.close("all")
    (job_dir / "metrics.json").write_text(json.dumps({"fsc_0.143": 8.5}))
    record = RunRecord(method="consensus", params={}, status="finished")
    record.add("plot", "curve.pdf", job_dir, "a curve")
    record.add("report", "metrics.json", job_dir, "metrics (JSON)")
    record.write(job_dir)
    job = new_job_of_type("cryohet.consensus")
    job.output_dir = f"{job_dir}/"
    job.create_post_run_output_nodes()
    assert {(n.name, n.toplevel_type, n.format) for n in job.output_nodes} == {
        (f"{job_dir}/curve.pdf", "LogFile", "pdf"), (f"{job_dir}/cryohet_run.json", "ProcessData", "json")}
    shown = {o.dobj_type: o for o in job.create_results_display()}
    assert shown["pdffile"].file_path == f"{job_dir}/curve.pdf" and shown["pdffile"].title == "a curve"
    assert shown["json"].file_path == f"{job_dir}/metrics.json" and "text" in shown and "pending" not in shown


def test_engine_in_another_environment(project, monkeypatch):
    """CRYOHET_PYTHON chooses the python a job runs the engine with (here the Scipion-pinned environment)."""
    project, sim_dir = project
    other = Path(sys.executable).parents[1].with_name(".venv") / "bin" / "python"
    assert other.is_file(), f"{other}: missing (make setup builds it)"
    monkeypatch.setenv("CRYOHET_PYTHON", str(other))
    job = _run(project, "cryohet.reconstruct", {"particles": f"{sim_dir}particles.star"}).output_dir
    assert _status(job) == "Succeeded", Path(job, "run.err").read_text()
    numpy = subprocess.run([str(other), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert read_record(Path(job)).versions["numpy"] == numpy != np.__version__


def test_bad_input_fails_the_job_with_the_engines_reason(project, tmp_path):
    project, _ = project
    bad = Path("not_particles.star")
    bad.write_text("data_particles\n\nloop_\n_rlnImageName #1\n1@missing.mrcs\n")
    job = _run(project, "cryohet.reconstruct", {"particles": str(bad)}).output_dir
    assert _status(job) == "Failed"
    err = Path(job, "run.err").read_text()
    assert "cryohet reconstruct: error:" in err and "not_particles.star" in err, err
    assert not Path(job, "map.mrc").exists()
