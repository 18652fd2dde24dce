"""One run per output folder: a lock file that names the run holding the folder (host, pid, start time).

The lock is created whole or not at all (written under a temporary name, then hard-linked to
``.cryohet.lock``, which fails when the lock exists; this also holds on NFS). A lock whose process has
ended on this host is stale: the run died without releasing it (killed, out of memory, node lost).
A lock held on another host cannot be checked from here.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryohet.errors import FolderInUse

LOCK_NAME = ".cryohet.lock"


@dataclass(frozen=True)
class Lock:
    """Who holds a folder: ``host``, ``pid``, ``started`` (seconds since the epoch), the method, and the
    holder's start time as the kernel counts it (``/proc/<pid>/stat``; tells a reused pid apart)."""

    host: str
    pid: int
    started: float
    method: str = ""
    proc_start: str | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"cryohet {self.method} (pid {self.pid} on host {self.host}, started {when})"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks after boot) of ``pid`` from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after "pid (command)": state is field 3, starttime field 22
    return fields[0], fields[19]


def own_lock(method: str) -> Lock:
    """The lock this process would hold for a run of ``method``."""
    stat = _proc_stat(os.getpid())
    return Lock(socket.gethostname(), os.getpid(), time.time(), method, stat[1] if stat else None)


def lock_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOCK_NAME


def read_lock(out_dir: str | Path) -> Lock | None:
    """The folder's lock, None when there is none; FolderInUse when it cannot be read."""
    return _read(lock_path(out_dir))


def _read(path: Path) -> Lock | None:
    try:
        return Lock(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise FolderInUse(path, f"unreadable run lock ({exc}); if no cryohet run is writing into "
                                f"{path.parent}, remove the file") from None


def holder_alive(lock: Lock) -> bool | None:
    """Whether the lock's process still runs: True or False on this host, None on another host."""
    if lock.host != socket.gethostname():
        return None
    try:
        os.kill(lock.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(lock.pid)
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and (lock.proc_start is None or start == lock.proc_start)


def _link_new(path: Path, lock: Lock) -> bool:
    """Create ``path`` holding ``lock`` unless it exists; True when created."""
    tmp = path.with_name(f"{path.name}.{lock.host}.{lock.pid}.tmp")
    tmp.write_text(json.dumps(asdict(lock)))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _set_aside(path: Path, stale: Lock) -> None:
    """Remove the stale lock ``stale`` from ``path``; a lock another run took in the meantime stays."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run removed it first
    if _read(aside) != stale:
        os.rename(aside, path)
    else:
        aside.unlink()


def busy_message(out_dir: Path, holder: Lock, alive: bool | None) -> str:
    """Why a run cannot start in ``out_dir`` while ``holder`` holds it."""
    if alive:
        return (f"{holder.describe()} is writing into this folder; wait for it to end, stop it, or choose "
                f"another --o")
    return (f"{holder.describe()} holds this folder and cannot be checked from host {socket.gethostname()}; "
            f"if that run has ended, remove {lock_path(out_dir)}")


def acquire(out_dir: str | Path, method: str) -> tuple[Lock, Lock | None]:
    """Take ``out_dir``'s lock for this process: (our lock, the stale lock of a dead run taken over, if any).

    Raises FolderInUse naming the holder when a live run (or one on another host) holds the folder.
    """
    out_dir = Path(out_dir)
    path = lock_path(out_dir)
    ours = own_lock(method)
    stale = None
    for _ in range(3):
        if _link_new(path, ours):
            return ours, stale
        holder = read_lock(out_dir)
        if holder is None:
            continue  # released in the meantime
        alive = holder_alive(holder)
        if alive is not False:
            raise FolderInUse(out_dir, busy_message(out_dir, holder, alive))
        stale = holder
        _set_aside(path, holder)
    raise FolderInUse(out_dir, f"could not take the run lock {path}; other runs are starting in this folder")


def release(out_dir: str | Path, lock: Lock) -> None:
    """Remove ``out_dir``'s lock if it is ``lock`` (a lock another run took over stays)."""
    path = lock_path(out_dir)
    try:
        if read_lock(out_dir) == lock:
            path.unlink()
    except (FolderInUse, FileNotFoundError):
        pass
