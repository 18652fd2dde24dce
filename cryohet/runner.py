"""Running one method: output folder, log file, device, progress, abort, and the run record."""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from cryohet.device import pick_device
from cryohet.errors import RunAborted
from cryohet.methods.base import Method
from cryohet.record import RunRecord

T = TypeVar("T")

#: When this variable names a file and the file appears, long loops stop (RELION's abort).
ABORT_ENV = "CRYOHET_ABORT_FILE"


@dataclass
class RunContext:
    out_dir: Path
    device: torch.device
    log: logging.Logger
    record: RunRecord
    seed: int

    def add(self, kind: str, path: str | Path, label: str = "", **meta: Any) -> None:
        """Register an output of the run (``path`` absolute or relative to the output folder)."""
        self.record.add(kind, path, self.out_dir, label, **meta)

    def check_abort(self) -> None:
        flag = os.environ.get(ABORT_ENV)
        if flag and os.path.exists(flag):
            raise RunAborted(f"abort requested ({flag})")

    def progress(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar on stderr, checking for an abort request at each step."""
        start = time.perf_counter()
        bar = tqdm(items, desc=desc, total=total, file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                   disable=os.environ.get("CRYOHET_NO_PROGRESS") == "1")
        for item in bar:
            self.check_abort()
            yield item
        self.log.info("%s: done in %.1f s", desc, time.perf_counter() - start)


def _setup_log(out_dir: Path, name: str, filename: str) -> logging.Logger:
    log = logging.getLogger(f"cryohet.{name}")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(out_dir / filename)
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    log.propagate = False
    return log


def run_method(method: Method, values: dict[str, Any], out_dir: str | Path) -> RunRecord:
    """Check ``values``, run ``method`` into ``out_dir`` and write its record.

    Raises ValueError for bad parameters, InputError for bad input files, RunAborted on abort;
    the record then says ``failed`` (or ``aborted``) with the reason.
    """
    params = method.resolve(values)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # torchrun: only rank 0 writes the record and run.log
    log = _setup_log(out_dir, method.name, "run.log" if rank == 0 else f"run.rank{rank}.log")
    record = RunRecord(method=method.name, params={k: v for k, v in params.items()})
    torch.set_num_threads(params["threads"])
    random.seed(params["seed"])
    np.random.seed(params["seed"])
    torch.manual_seed(params["seed"])
    ctx = RunContext(out_dir, pick_device(params["device"]), log, record, params["seed"])
    log.info("cryohet %s on %s, output in %s", method.name, ctx.device, out_dir)
    log.info("parameters: %s", ", ".join(f"{k}={v}" for k, v in params.items()))
    try:
        method.run(params, ctx)
    except RunAborted as exc:
        record.status, record.error = "aborted", str(exc)
        raise
    except Exception as exc:
        record.status, record.error = "failed", str(exc)
        raise
    else:
        record.status = "finished"
    finally:
        record.finished = time.time()
        if rank == 0:
            record.write(out_dir)
        for h in list(log.handlers):
            h.flush()
    for o in record.outputs:
        log.info("output %-14s %s", o.kind, out_dir / o.path)
    return record
