"""The Scipion plugin's engine command, GPU selection and parameter passing (no project needed)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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


#: A method that only the engine of the test below has (a module added to a copy of cryohet).
_PROBE_METHOD = """
from pathlib import Path
from cryohet.methods.base import Method, Param

METHOD = Method(name="probe-only-there", title="Only in the engine that runs", help="A test method.",
                params=(Param("width_A", float, 12.5, "Width (Å).", min=1.0),
                        Param("detail", int, 3, "An expert knob.", expert=True)),
                outputs=("volume",), run=lambda params, out: None, order=99)
"""

#: Run in a fresh Scipion process (as the GUI or a protocol run): what the plugin offers, and whether it imported
#: the engine's method modules itself (torch) to know it.
_SCIPION_SIDE = """
import json, sys
import cryohet_plugin.protocols as p
from pyworkflow.plugin import Domain
cls = p.CryohetProtProbeOnlyThere
form = {name: (param.label.get(), param.default.get()) for name, param in cls().getDefinition().iterParams()}
print(json.dumps({"form": form, "listed": "CryohetProtProbeOnlyThere" in Domain.getProtocols(),
                  "torch_here": "torch" in sys.modules, "reconstruct": hasattr(p, "CryohetProtReconstruct")}))
"""


def test_forms_come_from_the_engine_that_runs(tmp_path):
    """With the engine in another environment (the README's numpy-2 one, running a copy of cryohet that has one
    more method), Scipion's protocols and forms are that engine's (``cryohet describe``), built without importing
    torch on Scipion's side; a second process reads them from the cache."""
    current = Path(__file__).resolve().parents[1] / ".venv-current" / "bin" / "python"
    assert current.is_file(), f"{current}: missing (make setup-current builds the second environment)"
    engine = tmp_path / "engine"
    shutil.copytree(Path(cryohet.__file__).parent, engine / "cryohet", ignore=shutil.ignore_patterns("__pycache__"))
    (engine / "cryohet" / "methods" / "probe_only_there.py").write_text(_PROBE_METHOD)
    env = dict(os.environ, CRYOHET_PYTHON=str(current), CRYOHET_CACHE_DIR=str(tmp_path / "cache"),
               CRYOHET_ENV_ACTIVATION=f"export PYTHONPATH={shlex.quote(str(engine))}")
    for _ in range(2):  # first asks the engine, then reads the cache
        out = subprocess.run([sys.executable, "-c", _SCIPION_SIDE], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.splitlines()[-1])
        assert seen["listed"] and seen["reconstruct"] and not seen["torch_here"]
        assert seen["form"]["width_A"] == ["Width (Å)", "12.5"] and "detail" in seen["form"]
    assert len(list((tmp_path / "cache").glob("descriptions-*.json"))) == 1
    # this process's own engine has no such method
    assert not hasattr(__import__("cryohet_plugin.protocols").protocols, "CryohetProtProbeOnlyThere")


def test_engine_that_does_not_answer_is_named_by_validation(monkeypatch, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'No module named cryohet' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setitem(Plugin._vars, CRYOHET_PYTHON, str(fake))
    errors = Plugin.validateInstallation()
    assert len(errors) == 1 and "does not answer" in errors[0] and "No module named cryohet" in errors[0]


#: What ``scipion3 installb cryohet`` does once it has found the plugin (scipion-app's own installer code).
_INSTALLB = """
import cryohet_plugin
from pyworkflow.plugin import Domain
from scipion.install.plugin_funcs import PluginInfo
Domain.getPlugins()
PluginInfo(name="cryohet_plugin", plugin=cryohet_plugin, remote=False).installBin({"args": ["cryohet", "-j", "1"]})
"""

#: A fresh Scipion process after the install: where the plugin now runs the engine, and what that engine says.
_AFTER_INSTALL = """
import json, subprocess
from pyworkflow.plugin import Domain
Domain.getPlugins()
from cryohet_plugin import Plugin
cmd = Plugin.getEngineCommand(["describe", "--json"])
d = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
numpy = subprocess.run([cmd[0], "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True,
                       check=True).stdout.strip()
print(json.dumps({"python": Plugin.getVar("CRYOHET_PYTHON"), "engine_python": d["python"], "numpy": numpy,
                  "methods": [m["name"] for m in d["methods"]], "errors": Plugin.validateInstallation()}))
"""


def test_scipion_installb_makes_the_engines_own_environment(tmp_path):
    """Scipion's installer (scipion-app, as ``scipion3 installb cryohet``) makes the engine's environment under
    Scipion's software/em with the newest releases (numpy 2.x, apart from Scipion's 1.26), and the plugin then runs
    the engine there without any configuration. The engine is installed from this source tree with the CPU torch
    (CRYOHET_ENGINE_SOURCE), the default being the release from PyPI."""
    root = Path(cryohet.__file__).resolve().parents[1]
    em = tmp_path / "software" / "em"
    em.mkdir(parents=True)
    # Scipion's installer downloads an empty void.tgz from Scipion's server once; an installation has it already.
    subprocess.run(["tar", "czf", str(em / "void.tgz"), "-T", "/dev/null"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOHET_") or k == "CRYOHET_NO_PROGRESS"}
    env.update(SCIPION_HOME=str(tmp_path), CRYOHET_CACHE_DIR=str(tmp_path / "cache"), EM_ROOT=str(em),
               CRYOHET_ENGINE_SOURCE=f"-e {shlex.quote(str(root))} torch==2.13.0")
    out = subprocess.run([sys.executable, "-c", _INSTALLB], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    engine = em / f"cryohet-{cryohet.__version__}" / "bin" / "python"
    assert (engine.parent / "cryohet").is_file(), (out.stdout + out.stderr)[-4000:]
    out = subprocess.run([sys.executable, "-c", _AFTER_INSTALL], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["python"] == seen["engine_python"] == str(engine) and seen["errors"] == []
    assert seen["numpy"].startswith("2.") and "reconstruct" in seen["methods"]


def test_protocol_tree_shows_every_protocol_under_heterogeneity():
    """Scipion's protocol tree (what the project window's left panel shows, read from the plugins' protocols.conf)
    lists every cryohet protocol, and only those, under 3D > Analysis > Heterogeneity > cryohet, in the order of
    ``cryohet --help``."""
    import pyworkflow
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig

    import cryohet_plugin.protocols as protocols
    from cryohet.methods import all_methods

    views = ProtocolTreeConfig.load(Domain, pyworkflow.Config.SCIPION_PROTOCOLS)

    def child(node, text):
        found = [c for c in node.childs if c.text == text]
        assert found, (text, [c.text for c in node.childs])
        return found[0]

    node = views["Protocols SPA"]
    for text in ("3D", "Analysis", "Heterogeneity", "cryohet"):
        node = child(node, text)
    assert node.visible
    listed = [c.value for c in node.childs]
    assert listed == [protocols.class_name(name) for name in all_methods()]
    assert all(c.tag == "protocol" for c in node.childs)  # installed, not disabled
