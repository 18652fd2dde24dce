"""Runs you can trust: one run per folder, a record that tells the truth at every moment, no leaks.

A long run is the command line ``cryohet wait`` in a subprocess: a test method, added to the methods
package as a new module would be, that waits until it is stopped (checking for an abort as every long loop
does). The tests stop it (SIGTERM) or kill it (SIGKILL). Other runs are tiny and in-process.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faults import file_size_limit, temporaries

from cryohet.cli import main
from cryohet.errors import FolderInUse, InputError, OutputError, RunAborted
from cryohet.methods import get_method
from cryohet.methods.base import Method
from cryohet.record import read_record, run_state
from cryohet.runlock import LOCK_NAME, read_lock
from cryohet.runner import ABORT_ENV, run_method

TINY = {"n_particles": 20, "box": 16, "n_states": 2, "apix": 4.0, "resolution_A": 10.0}
WAIT_METHOD = """
import time
from cryohet.methods.base import Method

def run(params, ctx):
    ctx.log.info("waiting")
    while True:
        ctx.check_abort()
        time.sleep(0.05)

METHOD = Method(name="wait", title="Wait", help="waits until stopped", params=(), outputs=(), run=run)
"""
CLI_WITH_WAIT = ("import sys, cryohet.methods as m; m.__path__.append(sys.argv[1]); "
                 "from cryohet.cli import main; sys.exit(main(sys.argv[2:]))")


def _start_waiting(out: Path, tmp_path: Path) -> subprocess.Popen:
    """``cryohet wait --o out`` in a subprocess, returned once its record says running."""
    (tmp_path / "zz_wait_method.py").write_text(WAIT_METHOD)
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_WAIT, str(tmp_path), "wait", "--o", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "cryohet_run.json").exists() and read_record(out).status == "running":
            return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the waiting run did not start: {proc.communicate()[1][-2000:]}")


def _dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _toy(run) -> Method:
    return Method(name="toy-run", title="Toy", help="a test method", params=(), outputs=(), run=run)


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    run_method(get_method("simulate"), dict(TINY, n_particles=200, box=32, apix=3.0), out)
    return out / "particles.star"


def test_record_says_running_and_a_second_run_is_refused(tmp_path, capsys):
    out = tmp_path / "same"
    proc = _start_waiting(out, tmp_path)
    try:
        rec = read_record(out)
        assert (rec.status, rec.pid, rec.host) == ("running", proc.pid, socket.gethostname())
        assert rec.argv == ["cryohet", "wait", "--o", str(out)] and rec.finished is None
        assert set(rec.versions) == {"cryohet", "python", "numpy", "torch"}
        assert run_state(out) == "running" and read_lock(out).pid == proc.pid
        log_before = (out / "run.log").read_text()
        with pytest.raises(FolderInUse) as exc:
            run_method(get_method("simulate"), dict(TINY, seed=2, overwrite=True), out)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(exc.value)
        assert "cryohet wait" in str(exc.value) and "is writing into this folder" in str(exc.value)
        assert main(["simulate", "--o", str(out), "--seed", "2"]) == 2  # the CLI: one line, exit code 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        # the refused runs touched neither the record nor the log
        assert read_record(out).pid == proc.pid and read_record(out).method == "wait"
        assert (out / "run.log").read_text().startswith(log_before) and "seed=2" not in (out / "run.log").read_text()
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipe


def test_sigterm_records_aborted_and_exits_non_zero(tmp_path):
    out = tmp_path / "term"
    proc = _start_waiting(out, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    rec = read_record(out)
    assert rec.status == "aborted" and "SIGTERM" in rec.error and rec.finished is not None
    assert "SIGTERM" in err and "aborted: stopped by SIGTERM" in (out / "run.log").read_text()
    assert not (out / LOCK_NAME).exists() and run_state(out) == "aborted"


def test_killed_run_is_reported_died_then_taken_over(tmp_path):
    out = tmp_path / "killed"
    proc = _start_waiting(out, tmp_path)
    proc.kill()
    proc.communicate()
    assert read_record(out).status == "running" and run_state(out) == "died"
    with pytest.raises(FolderInUse) as exc:  # its lock is taken over, its record marked, the folder refused
        run_method(get_method("simulate"), TINY, out)
    assert "earlier cryohet wait run (died" in str(exc.value) and "--overwrite yes" in str(exc.value)
    rec = read_record(out)
    assert rec.status == "died" and f"pid {proc.pid}" in rec.error
    assert not (out / LOCK_NAME).exists()
    run_method(get_method("simulate"), dict(TINY, overwrite=True), out)
    assert run_state(out) == "finished" and read_record(out).pid == os.getpid()


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 1.7e9,
                                             "method": "simulate"}))
    (out / "cryohet_run.json").write_text(json.dumps({"method": "simulate", "params": {}, "status": "running",
                                                      "outputs": [], "pid": pid}))
    assert run_state(out) == "died"
    run_method(get_method("simulate"), dict(TINY, overwrite=True), out)
    log = (out / "run.log").read_text()
    assert f"lock was left by cryohet simulate (pid {pid} on host {socket.gethostname()}" in log
    assert "taken over" in log and "record now says 'died'" in log and "WARNING" in log
    assert read_record(out).status == "finished" and not (out / LOCK_NAME).exists()


def test_lock_held_on_another_host_is_refused(tmp_path):
    out = tmp_path / "remote"
    out.mkdir()
    lock = {"host": "node042.cluster", "pid": 4242, "started": time.time(), "method": "train-vae"}
    (out / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(FolderInUse) as exc:
        run_method(get_method("simulate"), TINY, out)
    msg = str(exc.value)
    assert "pid 4242 on host node042.cluster" in msg and f"remove {out / LOCK_NAME}" in msg
    assert json.loads((out / LOCK_NAME).read_text()) == lock  # left alone
    assert not (out / "cryohet_run.json").exists()


def test_rerun_into_a_finished_folder_needs_overwrite_or_resume(tmp_path):
    out = tmp_path / "again"
    sim = get_method("simulate")
    run_method(sim, dict(TINY, seed=1), out)
    with pytest.raises(FolderInUse) as exc:
        run_method(sim, dict(TINY, seed=2), out)
    msg = str(exc.value)
    assert str(out) in msg and "earlier cryohet simulate run (finished, started" in msg
    assert "--overwrite yes" in msg and "--resume" not in msg
    with pytest.raises(FolderInUse) as exc:  # a method that can resume names both flags
        run_method(get_method("principal-volumes"), {"particles": str(out / "particles.star")}, out)
    assert "--resume yes to continue it or --overwrite yes to replace it" in str(exc.value)
    assert read_record(out).params["seed"] == 1
    record = run_method(sim, dict(TINY, seed=2, overwrite=True), out)
    assert read_record(out).params["seed"] == 2 and record.status == "finished"
    assert (out / "run.log").read_text().count("parameters:") == 1  # the replaced run's log is gone
    empty = tmp_path / "empty"  # a folder a host made beforehand, with its own files: fine
    empty.mkdir()
    (empty / "note.txt").write_text("RELION's note\n")
    run_method(sim, TINY, empty)
    assert run_state(empty) == "finished"


def test_failed_run_error_in_record_and_log(tmp_path):
    out = tmp_path / "failed"
    with pytest.raises(InputError):
        run_method(get_method("reconstruct"), {"particles": str(tmp_path / "missing.star")}, out)
    rec = read_record(out)
    assert rec.status == "failed" and "missing.star" in rec.error and rec.finished is not None
    log = (out / "run.log").read_text()
    assert "ERROR cryohet reconstruct failed (InputError):" in log and "missing.star" in log
    assert not (out / LOCK_NAME).exists() and run_state(out) == "failed"


def test_unexpected_error_is_named_with_its_type(tmp_path):
    def crash(params, ctx):
        raise KeyError("rlnDefocusU")

    with pytest.raises(KeyError):
        run_method(_toy(crash), {}, tmp_path)
    assert read_record(tmp_path).error == "KeyError: 'rlnDefocusU'"


def _open_files() -> list[str]:
    return sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))


def _threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def _four_runs(folder: Path, particles: Path, monkeypatch) -> list[str]:
    """A successful reconstruct and principal-volumes run, a principal-volumes run aborted in the middle of its
    background-loaded pass, a failed run; their statuses."""
    pv, rec = get_method("principal-volumes"), get_method("reconstruct")
    run_method(rec, {"particles": str(particles)}, folder / "ok")
    run_method(pv, {"particles": str(particles), "max_iter": 1, "n_components": 1, "cache_mb": 0,
                    "movie_frames": 2}, folder / "pv")
    flag = folder / "abort"
    flag.touch()
    monkeypatch.setenv(ABORT_ENV, str(flag))
    with pytest.raises(RunAborted):  # the loader's thread has started when the abort is seen
        run_method(pv, {"particles": str(particles), "cache_mb": 0}, folder / "aborted")
    monkeypatch.delenv(ABORT_ENV)
    with pytest.raises(InputError):
        run_method(rec, {"particles": str(folder / "missing.star")}, folder / "failed")
    return [read_record(folder / d).status for d in ("ok", "pv", "aborted", "failed")]


def test_no_open_files_threads_or_handlers_after_runs(tmp_path, particles, monkeypatch):
    """Runs that succeed, abort or fail leave the process as they found it: the same open files, threads and
    signal handlers, no log handlers. (A first run opens what libraries keep for the process, such as
    matplotlib's font file: measured from the second.)"""
    _four_runs(tmp_path / "first", particles, monkeypatch)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gc.collect()  # what earlier tests left for the collector (e.g. their subprocesses' pipes)
    files, threads = _open_files(), _threads()
    statuses = _four_runs(tmp_path / "second", particles, monkeypatch)
    assert statuses == ["finished", "finished", "aborted", "failed"]
    assert _open_files() == files
    assert _threads() == threads
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert not logging.getLogger("cryohet.reconstruct").handlers
    assert not logging.getLogger("cryohet.principal-volumes").handlers


def test_convergence_is_recorded_and_warned(tmp_path):
    def iterate(params, ctx):
        ctx.report_convergence("EM", False, last_change=0.0123, tol=0.001, iterations=30)
        ctx.report_convergence("refinement", True, last_change=1e-5, tol=1e-4, iterations=4)

    record = run_method(_toy(iterate), {}, tmp_path)
    assert [c["converged"] for c in read_record(tmp_path).convergence] == [False, True]
    assert record.convergence[0] == {"what": "EM", "converged": False, "last_change": 0.0123, "tol": 0.001,
                                     "iterations": 30}
    log = (tmp_path / "run.log").read_text()
    assert "WARNING EM did not converge: last change 0.0123 against tolerance 0.001 after 30 iterations" in log
    assert "refinement" not in log


def test_write_report_is_atomic_and_registered(tmp_path):
    """ctx.write_report: the text (or its lines, each ending in a newline) in the output folder, registered as a
    report with its label and metadata in the run record; a write that runs out of room (a 100 KB file-size
    limit) leaves no file, no temporary and no entry."""
    def report(params, ctx):
        assert ctx.write_report(["# title", "", "- a line"], "the report", n=3) == ctx.out_dir / "report.md"
        ctx.write_report('{"a": 1}', "fit (JSON)", name="fit.json")

    out = tmp_path / "ok"
    run_method(_toy(report), {}, out)
    assert (out / "report.md").read_text() == "# title\n\n- a line\n" and (out / "fit.json").read_text() == '{"a": 1}'
    stored = [(o.kind, o.path, o.label, o.meta) for o in read_record(out).outputs]
    assert stored == [("report", "report.md", "the report", {"n": 3}), ("report", "fit.json", "fit (JSON)", {})]

    def too_big(params, ctx):
        ctx.write_report("x" * 200_000, "too big")

    out = tmp_path / "full"
    with file_size_limit(100_000), pytest.raises(OutputError, match="report.md: could not be written"):
        run_method(_toy(too_big), {}, out)
    record = read_record(out)
    assert record.status == "failed" and not record.outputs
    assert not (out / "report.md").exists() and not temporaries(out)


def test_other_ranks_are_not_refused_by_rank_0s_lock(tmp_path, monkeypatch):
    """torchrun: rank 0 holds the lock and writes the record; rank 1 runs beside it into the same folder."""
    seen = []
    run_method(_toy(lambda params, ctx: None), {}, tmp_path)  # an earlier run: rank 0 would need --overwrite
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "started": time.time(), "method": "toy-run"}))
    before = (tmp_path / "cryohet_run.json").read_text()
    monkeypatch.setenv("RANK", "1")
    run_method(_toy(lambda params, ctx: seen.append(ctx.out_dir)), {}, tmp_path)
    assert seen == [tmp_path.resolve()] and (tmp_path / "run.rank1.log").exists()
    assert (tmp_path / "cryohet_run.json").read_text() == before and (tmp_path / LOCK_NAME).exists()
