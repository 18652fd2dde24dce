"""Running one method: output folder (one run at a time), log, device, progress, abort, signals, run record."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from cryohet import __version__, runlock
from cryohet.atomic import atomic_path, temporaries_under
from cryohet.device import pick_device
from cryohet.errors import FolderInUse, InputError, RunAborted
from cryohet.methods.base import Method
from cryohet.record import RECORD_NAME, RunRecord, convergence_warning, mark_died, read_record

T = TypeVar("T")

#: When this variable names a file and the file appears, long loops stop (RELION's abort).
ABORT_ENV = "CRYOHET_ABORT_FILE"


class _Bar(tqdm):
    """tqdm without its monitor thread, which would outlive the run (the bar checks the time at each step,
    ``miniters=1``, so it needs no monitor to refresh)."""

    monitor_interval = 0


@dataclass
class RunContext:
    out_dir: Path
    device: torch.device
    log: logging.Logger
    record: RunRecord
    seed: int

    def add(self, kind: str, path: str | Path, label: str = "", **meta: Any) -> None:
        """Register an output of the run (``path`` absolute or relative to the output folder). A particles STAR
        with its cryoSPARC twin beside it (``write_particles_star``) names the twin in ``meta["cs"]``."""
        out = self.record.add(kind, path, self.out_dir, label, **meta)
        twin = Path(out.path).with_suffix(".cs")
        if kind == "particles_star" and "cs" not in out.meta and (self.out_dir / twin).is_file():
            out.meta["cs"] = twin.as_posix()

    def write_report(self, text: str | Sequence[str], label: str, name: str = "report.md", **meta: Any) -> Path:
        """Write the run's report ``name`` in the output folder (atomically: cryohet.atomic) and register it as an
        output of kind ``report``; returns its path. ``text``: the whole text, or its lines (joined, each ending
        in a newline)."""
        path = self.out_dir / name
        with atomic_path(path) as tmp:
            tmp.write_text(text if isinstance(text, str) else "".join(f"{line}\n" for line in text))
        self.add("report", name, label, **meta)
        return path

    def report_convergence(self, what: str, converged: bool, last_change: float, tol: float,
                           iterations: int) -> None:
        """Record whether the iterative step ``what`` met its stopping criterion.

        ``last_change`` and ``tol`` are in the step's own units (the same for both). The record keeps the
        numbers; when ``converged`` is false a WARNING goes to the log (the text of ``convergence_warning``,
        which the hosts and reports show too).
        """
        entry = {"what": what, "converged": bool(converged), "last_change": float(last_change), "tol": float(tol),
                 "iterations": int(iterations)}
        self.record.convergence.append(entry)
        warning = convergence_warning(entry)
        if warning:
            self.log.warning("%s", warning)

    def check_abort(self) -> None:
        flag = os.environ.get(ABORT_ENV)
        if flag and os.path.exists(flag):
            raise RunAborted(f"abort requested ({flag})")

    def progress(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar on stderr, checking for an abort request at each step."""
        start = time.perf_counter()
        bar = _Bar(items, desc=desc, total=total, file=sys.stderr, mininterval=1.0, miniters=1, dynamic_ncols=True,
                   disable=os.environ.get("CRYOHET_NO_PROGRESS") == "1")
        for item in bar:
            self.check_abort()
            yield item
        self.log.info("%s: done in %.1f s", desc, time.perf_counter() - start)


def _setup_log(out_dir: Path, name: str, filename: str, append: bool) -> logging.Logger:
    """The run's logger: to ``out_dir/filename`` (appended to, or started afresh) and to stderr."""
    log = logging.getLogger(f"cryohet.{name}")
    log.setLevel(logging.INFO)
    _close_log(log)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(out_dir / filename, mode="a" if append else "w")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    log.propagate = False
    return log


def _close_log(log: logging.Logger) -> None:
    """Detach and close every handler of ``log`` (its run.log stays closed after the run)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _versions() -> dict[str, str]:
    """Versions of cryohet, Python, numpy and torch (in the run record)."""
    return {"cryohet": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__}


def _reason(exc: BaseException) -> str:
    """The error as the record and the hosts show it: the message of a user-facing error, else type: message."""
    if isinstance(exc, (InputError, ValueError, RunAborted)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into RunAborted naming the signal, in the main thread only; the earlier
    handlers come back afterwards (and at the first signal, so that a second one acts as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def stop(signum: int, _frame: Any) -> None:
        restore()
        raise RunAborted(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        restore()


def _earlier_run(out_dir: Path) -> str | None:
    """A description of the earlier run whose record ``out_dir`` holds; None when it holds none."""
    if not (out_dir / RECORD_NAME).is_file():
        return None
    try:
        return read_record(out_dir).describe()
    except InputError:
        return "run whose record cannot be read"


def _check_folder(method: Method, params: dict[str, Any], out_dir: Path) -> None:
    """Refuse (FolderInUse) a folder that holds an earlier run unless --resume or --overwrite says yes."""
    earlier = _earlier_run(out_dir)
    if earlier is None or params["overwrite"] or params.get("resume"):
        return
    how = ("add --resume yes to continue it or --overwrite yes to replace it" if "resume" in params
           else "add --overwrite yes to replace it, or choose another --o")
    raise FolderInUse(out_dir, f"holds an earlier cryohet {earlier}; {how}")


def run_method(method: Method, values: dict[str, Any], out_dir: str | Path,
               command: Sequence[str] | None = None) -> RunRecord:
    """Check ``values``, run ``method`` into ``out_dir`` and write its record.

    One run per folder: the folder's lock refuses a second run while one runs (FolderInUse), and a
    folder with an earlier record needs ``overwrite`` (or ``resume``). The record says ``running`` from
    the start (with ``command``, default ``sys.argv``) and then ``finished``, ``failed`` or ``aborted``.
    Raises ValueError for bad parameters, InputError for bad input files, RunAborted on abort or on
    SIGTERM/SIGINT. Under torchrun only rank 0 takes the lock and writes the record and run.log.
    """
    params = method.resolve(values)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = list(sys.argv if command is None else command)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return _run(method, params, out_dir, command, rank, [])
    lock, stale = runlock.acquire(out_dir, method.name)
    try:
        notes = _dead_run_notes(out_dir, stale)
        _check_folder(method, params, out_dir)
        return _run(method, params, out_dir, command, rank, notes)
    finally:
        runlock.release(out_dir, lock)


def _dead_run_notes(out_dir: Path, stale: runlock.Lock | None) -> list[str]:
    """With the folder's lock held, a record that says running is of a run that died: mark it so. Lines
    for the log about that and about ``stale``, the lock of a dead process taken over."""
    notes = []
    if stale is not None:
        notes.append(f"the folder's lock was left by {stale.describe()}, whose process has ended; taken over")
    if mark_died(out_dir, stale) is not None:
        notes.append("the earlier run in this folder ended without finishing; its record now says 'died'")
    # no other process writes here now: what killed writers left under temporary names (cryohet.atomic) goes
    left = temporaries_under(out_dir)
    for p in left:
        p.unlink(missing_ok=True)
    if left:
        notes.append(f"removed {len(left)} file(s) a killed run left under temporary names")
    return notes


def _run(method: Method, params: dict[str, Any], out_dir: Path, command: list[str], rank: int,
         notes: list[str]) -> RunRecord:
    """Run ``method`` in a folder already checked; write the record (rank 0) and close the log, also on
    errors. ``notes`` are warnings for the log's start."""
    log = _setup_log(out_dir, method.name, "run.log" if rank == 0 else f"run.rank{rank}.log",
                     append=bool(params.get("resume")))
    record = RunRecord(method=method.name, params=dict(params), pid=os.getpid(), host=socket.gethostname(),
                       argv=command, versions=_versions())
    try:
        for note in notes:
            log.warning("%s", note)
        with _stop_on_signals():  # before the record says running, so that an abort seen then is recorded
            if rank == 0:
                record.write(out_dir)
            _execute(method, params, out_dir, log, record)
    except (RunAborted, KeyboardInterrupt) as exc:
        record.status, record.error = "aborted", _reason(exc)
        log.error("cryohet %s aborted: %s", method.name, record.error)
        raise
    except Exception as exc:
        record.status, record.error = "failed", _reason(exc)
        log.error("cryohet %s failed (%s): %s", method.name, type(exc).__name__, exc)
        raise
    else:
        record.status = "finished"
        for o in record.outputs:
            log.info("output %-14s %s", o.kind, out_dir / o.path)
    finally:
        record.finished = time.time()
        if rank == 0:
            record.write(out_dir)
        _close_log(log)
    return record


def _execute(method: Method, params: dict[str, Any], out_dir: Path, log: logging.Logger,
             record: RunRecord) -> None:
    """Seed the generators, pick the device and run the method."""
    torch.set_num_threads(params["threads"])
    random.seed(params["seed"])
    np.random.seed(params["seed"])
    torch.manual_seed(params["seed"])
    ctx = RunContext(out_dir, pick_device(params["device"]), log, record, params["seed"])
    log.info("cryohet %s on %s, output in %s", method.name, ctx.device, out_dir)
    log.info("parameters: %s", ", ".join(f"{k}={v}" for k, v in params.items()))
    method.run(params, ctx)
