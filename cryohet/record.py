"""The run record: a JSON file in each output folder listing what a run wrote.

Both hosts (the Scipion protocols and the RELION External job) read only this file to find
and register outputs. Paths are stored relative to the output folder. The record is written when a
run starts (status ``running``, with the process, host, command line and versions) and again when it
ends: ``finished``, ``failed`` or ``aborted`` with the reason, or ``died`` when a later look finds the
run's process gone without an end (see ``run_state``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryohet import __version__
from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.runlock import Lock, holder_alive, read_lock

RECORD_NAME = "cryohet_run.json"

#: Output kinds a run record may hold; both hosts map them onto their own types.
OUTPUT_KINDS = (
    "volume",          # one map (MRC)
    "half_map",        # one of two half-set maps (MRC); meta "of": the volume output they are halves of
    "volume_series",   # several maps along a motion or at cluster centres (MRC each)
    "mask",            # a 3-D mask (MRC)
    "local_resolution",  # local resolution per voxel, Å (MRC)
    "particles_star",  # RELION 3.1 particles STAR pointing at the original images
    "latents",         # per-particle latent coordinates (.npy, rows in STAR order)
    "fsc",             # FSC curve (.star / .json)
    "plot",            # PNG figure
    "model",           # trained weights / model files
    "chimerax",        # a ChimeraX script (.cxc)
    "report",          # Markdown report
    "ground_truth",    # simulator ground truth (.npz)
    "atomic_model",    # an atomic model (PDB / mmCIF), one model or several (a movie along a motion)
    "normal_modes",    # normal modes of an elastic network (.npz: eigenvalues, modes, atoms)
)


@dataclass
class Output:
    kind: str
    path: str
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """What a run is doing or did. Times are seconds since the epoch; ``convergence`` holds one entry per
    iterative step (``RunContext.report_convergence``)."""

    method: str
    params: dict[str, Any]
    status: str = "running"
    version: str = __version__
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    outputs: list[Output] = field(default_factory=list)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None
    host: str = ""
    argv: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``<method> run (<status>, started <local time>)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.method} run ({self.status}, started {when})"

    def add(self, kind: str, path: str | Path, out_dir: Path, label: str = "", **meta: Any) -> Output:
        """Register an output file (absolute or relative to ``out_dir``)."""
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        rel = Path(path)
        if rel.is_absolute():
            rel = rel.relative_to(out_dir.resolve())
        out = Output(kind, rel.as_posix(), label, meta)
        self.outputs.append(out)
        return out

    def of_kind(self, kind: str) -> list[Output]:
        return [o for o in self.outputs if o.kind == kind]

    def require(self, kind: str, run_dir: Path, what: str) -> Output:
        """The first output of ``kind``; InputError naming ``run_dir`` and ``what`` is missing when there is none."""
        outs = self.of_kind(kind)
        if not outs:
            raise InputError(run_dir, f"the {self.method} run holds no {what} ('{kind}' output)")
        return outs[0]

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / RECORD_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        return path


def read_record(out_dir: str | Path) -> RunRecord:
    """Read the record of a run folder; raise InputError when it is missing or malformed."""
    path = Path(out_dir) / RECORD_NAME
    if not path.is_file():
        raise InputError(path, "no run record: the run did not finish or this is not a cryohet output folder")
    try:
        raw = json.loads(path.read_text())
        outputs = [Output(**o) for o in raw.pop("outputs")]
        return RunRecord(outputs=outputs, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(path, f"malformed run record ({exc})") from None


def convergence_warning(entry: dict[str, Any]) -> str | None:
    """The warning for one ``convergence`` entry of a record; None when that step converged."""
    if entry.get("converged", True):
        return None
    return (f"{entry['what']} did not converge: last change {entry['last_change']:.3g} against tolerance "
            f"{entry['tol']:.3g} after {entry['iterations']} iterations")


def run_state(out_dir: str | Path) -> str:
    """The state of the run in ``out_dir``: ``none`` (no record), the record's status, or ``died`` for a
    record that says ``running`` while no live process on this host holds the folder's lock. A run
    holding the lock from another host is taken as ``running``."""
    if not (Path(out_dir) / RECORD_NAME).is_file():
        return "none"
    status = read_record(out_dir).status
    if status != "running":
        return status
    lock = read_lock(out_dir)
    return "died" if lock is None or holder_alive(lock) is False else "running"


def mark_died(out_dir: str | Path, holder: Lock | None) -> RunRecord | None:
    """Rewrite a record that says ``running`` as ``died``; ``holder`` is the lock its dead process left, if
    any. Return the record, None when there is no such record."""
    try:
        record = read_record(out_dir)
    except InputError:
        return None
    if record.status != "running":
        return None
    who = holder.describe() if holder is not None else f"pid {record.pid} on host {record.host}"
    record.status = "died"
    record.error = f"the run's process ended without finishing the run (killed?): {who}"
    record.write(Path(out_dir))
    return record
