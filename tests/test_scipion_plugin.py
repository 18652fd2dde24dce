"""The Scipion plugin's engine command, GPU selection and parameter passing (no project needed)."""
from __future__ import annotations

import subprocess
import sys

from pyworkflow.plugin import Domain

import cryohet
from cryohet_plugin import Plugin
from cryohet_plugin.constants import CRYOHET_ENV_ACTIVATION, CRYOHET_PYTHON
from cryohet_plugin.protocols import CryohetProtSimulate


def test_plugin_is_registered_through_the_entry_point():
    plugins = Domain.getPlugins()
    assert "cryohet_plugin" in plugins
    assert plugins["cryohet_plugin"].Plugin is Plugin
    assert Plugin.getVar(CRYOHET_PYTHON) == sys.executable  # default: the running python
    assert Plugin.validateInstallation() == []


def test_engine_command_is_an_argument_list(tmp_path, monkeypatch):
    tricky = str(tmp_path / "out dir; touch $HOME/pwned")
    cmd = Plugin.getEngineCommand(["simulate", "--o", tricky])
    assert cmd[:3] == [sys.executable, "-m", "cryohet.cli"] and cmd[-1] == tricky
    # with an activation command, bash runs it and then the untouched arguments
    monkeypatch.setitem(Plugin._vars, CRYOHET_ENV_ACTIVATION, "export CRYOHET_TEST_ACTIVATED=1")
    cmd = Plugin.getEngineCommand(["--version"])
    assert cmd[0] == "bash" and cmd[-4:] == [sys.executable, "-m", "cryohet.cli", "--version"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert cryohet.__version__ in out


def test_gpu_list_becomes_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert Plugin.getEnviron([1, 3])["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert Plugin.getEnviron(None)["CUDA_VISIBLE_DEVICES"] == "7"  # no GPU list: the environment's choice


def test_form_values_become_engine_arguments():
    prot = CryohetProtSimulate(n_particles=123, motion=2, discrete=True, useGpu=False, numberOfThreads=3)
    args = prot.engineArgs()
    pairs = dict(a.split("=", 1) for a in args[1:])
    assert args[0] == "simulate"
    assert pairs["--n_particles"] == "123"
    assert pairs["--motion"] == "interpolate"  # the enum index mapped back to the choice
    assert pairs["--discrete"] == "yes"
    assert pairs["--threads"] == "3" and pairs["--device"] == "cpu"
    assert pairs["--overwrite"] == "yes"  # the engine's folder is the protocol's own: running it again replaces it
    gpu = CryohetProtSimulate(useGpu=True, gpuList="0")
    assert "--device=auto" in gpu.engineArgs()
    assert gpu.getGpuList() == [0]


def test_failure_reason_and_summary_show_the_engines_state(tmp_path):
    """The protocol fails with the engine's reason (its record's error); a run whose process was killed shows as
    died; the summary shows the state and convergence warnings."""
    import json
    import socket

    from cryohet.runlock import LOCK_NAME
    from cryohet_plugin.protocols import CryohetProtReconstruct

    prot = CryohetProtReconstruct()
    prot.setWorkingDir(str(tmp_path))
    engine = tmp_path / "extra" / "cryohet"
    engine.mkdir(parents=True)
    record = {"method": "reconstruct", "params": {}, "status": "failed", "outputs": [], "version": "0",
              "error": "/data/particles.mrcs: file not found",
              "convergence": [{"what": "EM", "converged": False, "last_change": 0.02, "tol": 0.001,
                               "iterations": 30}]}
    (engine / "cryohet_run.json").write_text(json.dumps(record))
    assert prot._failureReason(2, ["some line"]) == \
        "cryohet reconstruct failed: /data/particles.mrcs: file not found"
    summary = prot._summary()
    assert summary[0].endswith("reconstruct: failed") and "Error: /data/particles.mrcs: file not found" in summary
    assert "Warning: EM did not converge: last change 0.02 against tolerance 0.001 after 30 iterations" in summary

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (engine / "cryohet_run.json").write_text(json.dumps(dict(record, status="running", error=None)))
    (engine / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1.7e9,
                                                "method": "reconstruct"}))
    assert prot._failureReason(-9, []) == ("cryohet reconstruct failed: the engine's process ended without "
                                           "finishing its run (killed by signal 9)")
    assert prot._summary()[0].endswith("reconstruct: died")
