"""Test session set-up: a private, headless Scipion environment (see shared/docs/HOSTS.md).

The variables are set before anything imports pyworkflow (pyworkflow reads them at import time)
and point into one temporary folder removed at the end of the session. Tests that do not use
Scipion only see a few environment variables and a temporary folder.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_SCIPION_TMP = Path(tempfile.mkdtemp(prefix="cryohet-scipion-"))
atexit.register(shutil.rmtree, _SCIPION_TMP, ignore_errors=True)

for _name, _value in {
    "SCIPION_DOMAIN": "pwem",
    "SCIPION_HOME": str(_SCIPION_TMP / "home"),
    "SCIPION_USER_DATA": str(_SCIPION_TMP / "userdata"),
    "SCIPION_PYTHON": sys.executable,
    "SCIPION_TEST_NOSYNC": "1",
    "MPLCONFIGDIR": str(_SCIPION_TMP / "mpl"),
    "MPLBACKEND": "Agg",
    "CRYOHET_CACHE_DIR": str(_SCIPION_TMP / "cache"),  # the plugin's description cache (cryohet_plugin.descriptions)
}.items():
    os.environ[_name] = _value

# scipion-em-relion runs RELION's programs from $RELION_HOME/bin (Debian's RELION: /usr).
_relion = shutil.which("relion_reconstruct")
if _relion and "RELION_HOME" not in os.environ:
    os.environ["RELION_HOME"] = str(Path(_relion).resolve().parent.parent)

(_SCIPION_TMP / "home" / "config").mkdir(parents=True)
(_SCIPION_TMP / "userdata").mkdir()
(_SCIPION_TMP / "mpl").mkdir()

try:
    from pyworkflow.protocol import HostConfig
except ImportError:  # Scipion is not installed: the Scipion tests will say so themselves
    HostConfig = None
if HostConfig is not None:
    HostConfig.writeBasic(str(_SCIPION_TMP / "home" / "config" / "hosts.conf"))


def pytest_report_header(config):
    """The versions under test: make test runs the suite in the Scipion-pinned and in the newest environment."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("numpy", "torch", "scipy", "matplotlib", "pandas", "starfile", "mrcfile", "scipion-pyworkflow"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return "cryohet environment: " + ", ".join(found)


#: ``make test`` runs the suite in two environments at once (Scipion's pins and the newest releases) and names
#: each in this variable; without it (pytest run by hand) every test runs.
STACK_VARIABLE = "CRYOHET_TEST_STACK"
STACKS = ("pinned", "current")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "one_stack(name): a long accuracy test that make test runs in one of its two environments "
        f"({', '.join(STACKS)}) only; the light tests of the same code run in both")


def pytest_collection_modifyitems(config, items):
    """Under ``make test``, leave out the ``one_stack`` tests that belong to the other environment (pytest's
    summary counts them as deselected; the other environment's run runs them)."""
    stack = os.environ.get(STACK_VARIABLE)
    if not stack:
        return
    if stack not in STACKS:
        raise ValueError(f"{STACK_VARIABLE}={stack!r}: expected one of {STACKS}")
    keep, other = [], []
    for item in items:
        marker = item.get_closest_marker("one_stack")
        if marker is not None and marker.args[0] not in STACKS:
            raise ValueError(f"{item.nodeid}: one_stack({marker.args[0]!r}) names no environment of {STACKS}")
        (other if marker is not None and marker.args[0] != stack else keep).append(item)
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = keep
