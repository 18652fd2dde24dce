"""Atomic file output: write to a temporary name in the same folder, rename on success.

A failed write (an exception, a full disk, a file-size limit) leaves nothing under the final name and removes
the temporary file; a killed process may leave a temporary (a hidden ``.<name>.*`` file), never a half-written
file under the final name. ``remove_temporaries`` clears what a killed writer left.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cryohet.errors import OutputError

#: errno values that mean the disk (or the quota, or the process's file-size limit) has no room left
NO_ROOM = {errno.ENOSPC: "no space left on the device",
           errno.EFBIG: "file too large for the file system or the process's file-size limit",
           errno.EDQUOT: "disk quota exceeded"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, *, keep_previous: Path | None = None,
                durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the final suffix of ``path`` so that libraries that look at the
    extension (mrcfile, starfile) behave as for the real name.
    ``keep_previous``: the file already at ``path`` (if any) is renamed to this just before the new one takes
    its place, so that a crash between the two renames leaves it complete under ``keep_previous``.
    ``durable``: the new file's data (and the folder's entries) are flushed to the disk, so that it is complete
    after a power loss too (checkpoints).
    Running out of room (ENOSPC, EFBIG, EDQUOT) raises ``OutputError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _no_room_is_an_output_error(path):
        tmp_path = temporary_beside(path, suffix if suffix is not None else path.suffix)
        try:
            yield tmp_path
            if durable:
                _fsync(tmp_path)
            if keep_previous is not None and path.exists():
                os.replace(path, keep_previous)
            os.replace(tmp_path, path)
            if durable:
                _fsync(path.parent)
        finally:
            tmp_path.unlink(missing_ok=True)


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_path`` writers of ``path`` left when they were killed; returns
    them. Only for a file no other process is writing now."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def temporaries_under(folder: str | os.PathLike) -> list[Path]:
    """Every file under ``folder`` (recursively) with a name that ``temporary_beside`` gives."""
    return sorted(p for p in Path(folder).rglob(".*.part*") if p.is_file())


def temporary_beside(path: Path, suffix: str) -> Path:
    """An empty file beside ``path`` (hidden, unique, ``.<name>.*.part<suffix>``: what a killed writer leaves
    under such a name is cleared by the next run in the folder) with the usual permissions of a new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    return Path(tmp)


@contextlib.contextmanager
def _no_room_is_an_output_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_ROOM or isinstance(exc, OutputError):
            raise
        raise OutputError(path, f"could not be written: {NO_ROOM[exc.errno]}; nothing was left under this "
                                "name. Free some space (or raise the limit) and run again") from exc


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (a folder where the file system allows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if path.is_dir():
            with contextlib.suppress(OSError):  # some network file systems refuse to sync a folder
                os.fsync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as a .npy file at ``path`` through a temporary name (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
