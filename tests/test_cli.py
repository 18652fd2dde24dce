"""The command line: every command's --help renders (units and defaults included) and exits 0."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cryohet import __version__
from cryohet.cli import main
from cryohet.methods import all_methods

METHODS = all_methods()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_command_help_lists_its_parameters(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for p in METHODS[name].all_params():
        assert p.flag in text, p.flag
        if p.default is not None:
            shown = ("yes" if p.default else "no") if p.type is bool else p.default
            assert f"(default: {shown})" in text, p.name
    assert "--o DIR" in text


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_methods_are_discovered_and_listed_in_order(tmp_path, monkeypatch, capsys) -> None:
    """Every module of cryohet.methods with a METHOD is a command, in ``Method.order``; a new module is found
    without editing any list (here a module added to the package's path)."""
    import sys

    import cryohet.methods as pkg
    from cryohet.methods import method_modules

    order = ["simulate", "reconstruct", "classify", "principal-volumes", "train-vae", "analyze", "eval-volume",
             "select", "benchmark-make", "benchmark-score", "validate-halfsets", "consensus"]
    assert [m for m in METHODS if m in order] == order
    assert "base" not in method_modules() and len(method_modules()) == len(METHODS)
    (tmp_path / "zz_toy.py").write_text(
        "from cryohet.methods.base import Method\n"
        "METHOD = Method(name='toy', title='Toy', help='a test method', params=(), outputs=(), run=print, order=15)\n")
    (tmp_path / "zz_helper.py").write_text("X = 1\n")  # no METHOD: not a command
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "cryohet.methods.zz_toy", raising=False)
    names = list(pkg.all_methods())
    assert names[:3] == ["simulate", "toy", "reconstruct"] and len(names) == len(METHODS) + 1
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.index("simulate") < out.index("toy") < out.index("reconstruct")
    sys.modules.pop("cryohet.methods.zz_toy", None)
    sys.modules.pop("cryohet.methods.zz_helper", None)


def test_describe_json_is_every_method_as_the_engine_has_it(capsys: pytest.CaptureFixture[str]) -> None:
    """What hosts build their forms from (``cryohet describe --json``) reads back as the engine's own descriptions."""
    from cryohet.describe import from_json, source_key

    assert main(["describe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["key"] == source_key() and data["version"] == __version__
    back = from_json(data)
    assert list(back) == list(METHODS)
    for name, m in METHODS.items():
        b = back[name]
        assert (b.params, b.common_params, b.outputs, b.title, b.help, b.citations, b.order, b.needs_poses) == (
            m.params, m.common_params, m.outputs, m.title, m.help, m.citations, m.order, m.needs_poses), name
        with pytest.raises(RuntimeError, match="does not run"):
            b.run({}, Path("."))
    data["schema"] = 99
    with pytest.raises(ValueError, match="schema 99"):
        from_json(data)


def test_describe_key_imports_no_method() -> None:
    """``describe --key`` is what Scipion runs in each of its processes: it must not import torch."""
    code = ("import sys; from cryohet.cli import main; main(['describe', '--key']); "
            "print('torch' in sys.modules, any(m.startswith('cryohet.methods.') and m != 'cryohet.methods.base' "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(out[0]) == 20 and out[1:] == ["False", "False"]


def test_help_imports_no_engine() -> None:
    """``cryohet --help`` and a command's ``--help`` read every method's parameters but import neither torch nor
    pandas (the engines are imported when a method runs): a help that imported them took 3-4 s instead of 0.5."""
    code = ("import sys; from cryohet.cli import main\n"
            "for argv in (['--help'], ['benchmark-make', '--help'], ['train-vae', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "print('torch' in sys.modules, 'pandas' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.split() == ["False", "False"], out.stderr
