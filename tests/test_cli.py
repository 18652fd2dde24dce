"""The command line: every command's --help renders (units and defaults included) and exits 0."""
from __future__ import annotations

import pytest

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
