"""The run record: a JSON file in each output folder listing what a run wrote.

Both hosts (the Scipion protocols and the RELION External job) read only this file to find
and register outputs. Paths are stored relative to the output folder.
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

RECORD_NAME = "cryohet_run.json"

#: Output kinds a run record may hold; both hosts map them onto their own types.
OUTPUT_KINDS = (
    "volume",          # one map (MRC)
    "half_map",        # one of two half-set maps (MRC)
    "volume_series",   # several maps along a motion or at cluster centres (MRC each)
    "mask",            # a 3-D mask (MRC)
    "particles_star",  # RELION 3.1 particles STAR pointing at the original images
    "latents",         # per-particle latent coordinates (.npy, rows in STAR order)
    "fsc",             # FSC curve (.star / .json)
    "plot",            # PNG figure
    "model",           # trained weights / model files
    "chimerax",        # a ChimeraX script (.cxc)
    "report",          # Markdown report
    "ground_truth",    # simulator ground truth (.npz)
)


@dataclass
class Output:
    kind: str
    path: str
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    method: str
    params: dict[str, Any]
    status: str = "running"
    version: str = __version__
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    outputs: list[Output] = field(default_factory=list)

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
