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
    pairs = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "simulate"
    assert pairs["--n_particles"] == "123"
    assert pairs["--motion"] == "interpolate"  # the enum index mapped back to the choice
    assert pairs["--discrete"] == "yes"
    assert pairs["--threads"] == "3" and pairs["--device"] == "cpu"
    gpu = CryohetProtSimulate(useGpu=True, gpuList="0")
    assert dict(zip(gpu.engineArgs()[1::2], gpu.engineArgs()[2::2]))["--device"] == "auto"
    assert gpu.getGpuList() == [0]
