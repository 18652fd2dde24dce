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
