"""The memory plan of half-set reconstruction: the refusal, before anything is allocated, of a box that does not
fit (with the largest box that does)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from relion_tools import noise_stack_star

from cryohet.cli import main
from cryohet.device import free_memory_bytes
from cryohet.errors import InputError
from cryohet.geometry.backproject import reconstruction_bytes
from cryohet.reconstruct.homogeneous import MEMORY_FRACTION, check_reconstruction_fits

APIX = 2.0


def test_box_too_large_is_refused_with_the_largest_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Images of box 1024 (430 GB to reconstruct) are refused before anything is allocated: exit 2, the STAR
    named, the box that fits named (it does fit, the next one up does not), and no map written."""
    star = noise_stack_star(tmp_path, 2, 1024, APIX, sparse=True)
    out = tmp_path / "out"
    assert main(["reconstruct", "--particles", str(star), "--o", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert str(star) in err and "box 1024" in err and "GB free" in err
    assert not any(out.glob("*.mrc")) and json.loads((out / "cryohet_run.json").read_text())["status"] == "failed"
    with pytest.raises(InputError) as exc:
        check_reconstruction_fits(1024, torch.device("cpu"), star)
    named = int(str(exc.value).split("enough for box ")[1].split(":")[0])
    usable = MEMORY_FRACTION * free_memory_bytes(torch.device("cpu"))
    assert 0 < named < 1024 and named % 2 == 0
    assert reconstruction_bytes(named) <= 1.05 * usable < reconstruction_bytes(named + 2) * 1.05
