"""Wall and CPU time and peak memory of one whole command, for the side-by-side bench scripts."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cost:
    """Whole-command wall and CPU (user + system) seconds and peak resident memory (GB, largest process)."""

    wall_s: float
    cpu_s: float
    peak_gb: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.wall_s + other.wall_s, self.cpu_s + other.cpu_s, max(self.peak_gb, other.peak_gb))


def timed(cmd: list[str], cwd: Path, log: Path) -> Cost:
    """Run one command (its output to ``log``) and measure it."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return Cost(time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20)
