"""Running protocols of a real Scipion project in tests (see shared/docs/HOSTS.md)."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def launch(project, prot, ok: bool = True):
    """Run ``prot`` in ``project`` and return it as the runner process stored it; fail the test with its logs
    when it did not finish (unless ``ok`` is False)."""
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())  # re-read what the runner process stored
    if ok and not prot.isFinished():
        logs = [Path(f).read_text()[-3000:] for f in prot.getLogPaths() if os.path.exists(f)]
        pytest.fail(f"{prot.getRunName()} did not finish: {prot.getErrorMessage()}\n" + "\n".join(logs))
    return prot


@contextlib.contextmanager
def new_project(name: str) -> Iterator:
    """A new Scipion project (``cryohet_<name>_<random>``), the working folder while it is open."""
    from pyworkflow.project import Manager

    cwd = os.getcwd()
    proj = Manager().createProject(f"cryohet_{name}_{uuid.uuid4().hex[:8]}")
    os.chdir(proj.path)
    try:
        yield proj
    finally:
        os.chdir(cwd)


def simulate(project, n_particles: int, box: int = 32, apix: float = 3.0):
    """cryohet's simulate protocol run in ``project``: a hinge in three states, 8 Å, SNR 1, on the CPU."""
    from cryohet_plugin.protocols import CryohetProtSimulate

    return launch(project, project.newProtocol(CryohetProtSimulate, n_particles=n_particles, box=box, apix=apix,
                                               n_states=3, resolution_A=8.0, snr=1.0, useGpu=False,
                                               numberOfThreads=2))
