"""Errors that reach the user as one clear line and a non-zero exit."""
from __future__ import annotations

import os


class InputError(Exception):
    """Bad input: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class RunAborted(Exception):
    """The user asked the run to stop (RELION's abort file, see ``cryohet.runner.ABORT_ENV``)."""


class FolderInUse(InputError):
    """The output folder is taken: a run is writing into it, or it holds an earlier run that the user
    did not choose to continue (``--resume``) or replace (``--overwrite``)."""


class OutputError(OSError):
    """An output could not be written (a full disk, a quota, a file-size limit): the message names the file
    and the problem; nothing half-written is left under that name (``cryohet.atomic``)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")
