"""The memory plan of half-set reconstruction: the refusal, before anything is allocated, of a box that does not
fit (with the largest box that does)."""
from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from relion_tools import pose_ctf_star

from cryohet.cli import main
from cryohet.device import free_memory_bytes
from cryohet.errors import InputError
from cryohet.geometry.backproject import reconstruction_bytes
from cryohet.io.star import read_star, write_star
from cryohet.reconstruct.homogeneous import MEMORY_FRACTION, check_reconstruction_fits

APIX = 2.0

def _particles(d: Path, n: int, box: int, sparse: bool = False) -> Path:
    """A STAR of ``n`` random poses and CTFs pointing at a stack of noise (``sparse``: an unwritten stack)."""
    d.mkdir(exist_ok=True)
    star = d / "p.star"
    pose_ctf_star(star, n, box, APIX, seed=3)
    blocks = read_star(star)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@stack.mrcs" for i in range(n)]
    write_star(star, blocks)
    with mrcfile.new_mmap(d / "stack.mrcs", (n, box, box), mrc_mode=2) as m:
        if not sparse:
            m.data[:] = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
        m.voxel_size = APIX
    return star


def test_box_too_large_is_refused_with_the_largest_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Images of box 1024 (430 GB to reconstruct) are refused before anything is allocated: exit 2, the STAR
    named, the box that fits named (it does fit, the next one up does not), and no map written."""
    star = _particles(tmp_path, 2, 1024, sparse=True)
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
