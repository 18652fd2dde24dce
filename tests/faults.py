"""Fault injection for the tests: runs killed at chosen moments (from outside, or by themselves in the middle
of writing a checkpoint or between its two renames) and a file-size limit standing in for a full disk."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryohet.runlock import LOCK_NAME

#: Code run before a method in a child process: it kills itself with SIGKILL, as a crash would, when the
#: checkpoint of step MID_WRITE (epoch or EM iteration) is half written, or when the checkpoint of step
#: BETWEEN_RENAMES has pushed the previous one to ``.prev`` but does not hold the newest name yet.
_SELF_KILL = """
import os, pathlib, signal
import safetensors.torch as _st
_real_save, _real_write, _real_replace, _step = _st.save, pathlib.Path.write_bytes, os.replace, [None]

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

def _save(tensors, metadata=None):
    meta = metadata or {{}}
    if "checkpoint" in meta.get("format", ""):
        _step[0] = int(meta.get("epoch", meta.get("iteration", -1)))
    return _real_save(tensors, metadata=metadata)

def _write_bytes(self, data):
    if self.name.startswith(".checkpoint.") and _step[0] == {mid_write}:
        _real_write(self, data[: len(data) // 2])
        _die()
    return _real_write(self, data)

def _rename(src, dst):
    _real_replace(src, dst)
    if str(dst).endswith(".prev.safetensors") and _step[0] == {between_renames}:
        _die()

_st.save, pathlib.Path.write_bytes, os.replace = _save, _write_bytes, _rename
"""


def self_kill(mid_write: int | None = None, between_renames: int | None = None) -> str:
    """Python code to put before a run's code in a child process: the fault described at ``_SELF_KILL``."""
    return _SELF_KILL.format(mid_write=mid_write, between_renames=between_renames)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def start(code: str) -> subprocess.Popen:
    """``code`` in a child Python process (no progress bars, output discarded)."""
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1")
    return subprocess.Popen(python(code), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_until_killed(code: str, timeout_s: float = 120) -> None:
    """Run ``code`` (with a ``self_kill`` fault) in a child process and check that it died by SIGKILL."""
    proc = start(code)
    try:
        proc.wait(timeout_s)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was to kill itself, it ended with {proc.returncode}"


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay_s: float, timeout_s: float = 120) -> None:
    """SIGKILL ``proc`` ``delay_s`` seconds after ``ready()`` first holds (polled every 20 ms); it must still be
    running then."""
    deadline = time.time() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "timed out waiting for the moment to kill the run"
            time.sleep(0.02)
        time.sleep(delay_s)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def temporaries(folder: Path) -> list[Path]:
    """Files under temporary names (``cryohet.atomic``: hidden ``.<name>.*``) anywhere under ``folder`` (the
    folder's lock is not one)."""
    return sorted(p for p in folder.rglob(".*") if p.is_file() and p.name != LOCK_NAME)


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """No file of this process may grow beyond ``max_bytes`` (RLIMIT_FSIZE) while the block runs: writes beyond
    it fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child process: ``file_size_limit`` for its whole life."""
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return setup
