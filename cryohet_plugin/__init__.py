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

from .constants import CRYOHET_ENGINE_SOURCE, CRYOHET_ENV_ACTIVATION, CRYOHET_PYTHON, ENGINE_PACKAGE

_logo = ""
_references: list[str] = []


class Plugin(pwem.Plugin):
    """Where the engine lives and how to start it."""

    _url = "https://github.com/cryohet/cryohet"
    _processingField = ["SPA", "FLEXIBILITY"]

    @classmethod
    def _defineVariables(cls) -> None:
        cls._defineVar(CRYOHET_PYTHON, cls.defaultEnginePython(),
                       description="Python interpreter of the environment where cryohet (the engine) is installed "
                                   "(default: the one `scipion3 installb cryohet` made, else Scipion's own).",
                       var_type=VarTypes.FILENAME)
        cls._defineVar(CRYOHET_ENV_ACTIVATION, "",
                       description="Optional shell command run before the engine, e.g. 'conda activate cryohet'.",
                       var_type=VarTypes.STRING)
        cls._defineVar(CRYOHET_ENGINE_SOURCE, f"cryohet=={__version__}",
                       description="What `scipion3 installb cryohet` pip-installs into the engine's environment "
                                   "(pip arguments: a release, a source folder or wheel, a torch build).",
                       var_type=VarTypes.STRING)

    @classmethod
    def engineEnvDir(cls) -> str:
        """The engine's environment that ``scipion3 installb cryohet`` makes: ``<EM_ROOT>/cryohet-<version>``."""
        return os.path.join(pwem.Config.EM_ROOT, f"{ENGINE_PACKAGE}-{__version__}")

    @classmethod
    def defaultEnginePython(cls) -> str:
        """The python of ``engineEnvDir()`` once installed, else Scipion's own."""
        installed = os.path.join(cls.engineEnvDir(), "bin", "python")
        return installed if os.path.isfile(installed) else sys.executable

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
        cmd = [cls.engineVar(CRYOHET_PYTHON) or cls.defaultEnginePython(), "-m", "cryohet.cli", *map(str, args)]
        activation = cls.engineVar(CRYOHET_ENV_ACTIVATION).strip()
        if activation:
            cmd = ["bash", "-c", f'{activation} && exec "$@"', "cryohet", *cmd]
        return cmd

    @classmethod
    def defineBinaries(cls, env) -> None:
        """``scipion3 installb cryohet``: the engine in its own virtual environment, ``engineEnvDir()``, with the
        newest releases of its dependencies (a CUDA build of torch from PyPI on Linux), apart from Scipion's pins;
        ``CRYOHET_PYTHON`` then defaults to its python. Scipion's installer runs one shell line: every value in it
        is quoted."""
        target = cls.engineEnvDir()
        python = shlex.quote(os.path.join(target, "bin", "python"))
        source = " ".join(map(shlex.quote, shlex.split(cls.engineVar(CRYOHET_ENGINE_SOURCE)
                                                       or f"{ENGINE_PACKAGE}=={__version__}")))
        cmd = (f"{shlex.quote(sys.executable)} -m venv {shlex.quote(target)} && {python} -m pip install -q --upgrade "
               f"pip && {python} -m pip install {source} && {python} -m cryohet.cli describe --key")
        env.addPackage(ENGINE_PACKAGE, version=__version__, tar="void.tgz", commands=[(cmd, ["bin/cryohet"])],
                       default=True)

    @classmethod
    def validateInstallation(cls) -> list[str]:
        python = cls.engineVar(CRYOHET_PYTHON) or cls.defaultEnginePython()
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
