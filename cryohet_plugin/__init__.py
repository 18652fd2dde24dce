"""Scipion plugin for cryohet: one protocol per engine method, run as a separate process.

Registered through the ``pyworkflow.plugin`` entry point; Scipion then finds the protocols in
``cryohet_plugin.protocols`` (generated from the engine's method descriptions) and the viewers in
``cryohet_plugin.viewers``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence

import pwem
import pyworkflow.utils as pwutils
from pyworkflow.config import VarTypes

from cryohet import __version__

from .constants import CRYOHET_ENV_ACTIVATION, CRYOHET_PYTHON

_logo = ""
_references: list[str] = []


class Plugin(pwem.Plugin):
    """Where the engine lives and how to start it."""

    _url = "https://github.com/cryohet/cryohet"
    _processingField = ["SPA", "FLEXIBILITY"]

    @classmethod
    def _defineVariables(cls) -> None:
        cls._defineVar(CRYOHET_PYTHON, sys.executable,
                       description="Python interpreter of the environment where cryohet (the engine) is installed.",
                       var_type=VarTypes.FILENAME)
        cls._defineVar(CRYOHET_ENV_ACTIVATION, "",
                       description="Optional shell command run before the engine, e.g. 'conda activate cryohet'.",
                       var_type=VarTypes.STRING)

    @classmethod
    def engineVar(cls, name: str) -> str:
        """A plugin variable; from the environment when Scipion has not registered the plugin yet (a script that
        imports the protocols first)."""
        return cls.getVar(name) or os.environ.get(name) or ""

    @classmethod
    def getEnviron(cls, gpus: Sequence[int] | None = None) -> pwutils.Environ:
        """Environment of the engine process; ``gpus`` becomes CUDA_VISIBLE_DEVICES."""
        env = pwutils.Environ(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        return env

    @classmethod
    def getEngineCommand(cls, args: Sequence[str]) -> list[str]:
        """Argument list that runs ``cryohet <args>`` with the configured python.

        Values are passed as separate arguments and never pasted into a shell line; with an
        activation command, bash runs it and then ``exec "$@"`` on the untouched arguments.
        """
        cmd = [cls.engineVar(CRYOHET_PYTHON) or sys.executable, "-m", "cryohet.cli", *map(str, args)]
        activation = cls.engineVar(CRYOHET_ENV_ACTIVATION).strip()
        if activation:
            cmd = ["bash", "-c", f'{activation} && exec "$@"', "cryohet", *cmd]
        return cmd

    @classmethod
    def defineBinaries(cls, env) -> None:
        """Nothing to build: the engine is a Python package (``pip install cryohet``)."""

    @classmethod
    def validateInstallation(cls) -> list[str]:
        python = cls.engineVar(CRYOHET_PYTHON) or sys.executable
        if not (os.path.isfile(python) or shutil.which(python)):
            return [f"{CRYOHET_PYTHON} = {python}: no such python. Point it at the interpreter of the "
                    "environment where cryohet is installed."]
        from .descriptions import EngineUnreachable, ask_engine

        try:
            ask_engine(cls, "--key", timeout_s=120)
        except EngineUnreachable as exc:
            return [f"the cryohet engine does not answer: {exc}. Install cryohet in the environment of "
                    f"{CRYOHET_PYTHON} ({python}) or fix {CRYOHET_ENV_ACTIVATION}."]
        return []

    @classmethod
    def getActiveVersion(cls, home=None, versions=None) -> str:
        return __version__

    @classmethod
    def describeCommand(cls, cmd: Sequence[str]) -> str:
        """The command as a shell would show it (for logs only)."""
        return " ".join(shlex.quote(c) for c in cmd)
