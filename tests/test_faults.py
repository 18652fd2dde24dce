"""Faults while writing: a full disk leaves no half-written file under a final name; checkpoints keep the previous
good one and refuse a truncated or corrupt one. (Runs killed at several points and resumed: test_vae.py and
test_principal_volumes.py.)"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from faults import file_size_limit, limit_file_size, temporaries

from cryohet.atomic import atomic_path, remove_temporaries, temporaries_under
from cryohet.errors import InputError, OutputError
from cryohet.io.mrc import open_stack, read_map
from cryohet.io.star import write_star
from cryohet.io.weights import previous_path, read_checkpoint, read_weights, write_weights
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.runner import run_method

#: 20 images of box 32 (an 82 KB stack) and maps of 132 KB: under a 100 KB file-size limit the stack and the STAR
#: are written, the first map is not
SIM = dict(box=32, apix=4.0, resolution_A=10.0, n_particles=20, n_states=4, threads=1, seed=1)
LIMIT = 100_000


def test_a_write_that_runs_out_of_room_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old, complete")
    with pytest.raises(OutputError, match=f"{path}: could not be written: no space left on the device"):
        with atomic_path(path) as tmp:
            tmp.write_text("new, half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(RuntimeError, match="not about room"):  # other errors pass through as they are
        with atomic_path(path) as tmp:
            raise RuntimeError("not about room")
    assert path.read_text() == "old, complete" and not temporaries(tmp_path)


def test_a_full_disk_while_a_method_writes_leaves_no_half_written_output(tmp_path: Path) -> None:
    """simulate under a 100 KB file-size limit (EFBIG, as a full disk): a clear error naming the file, a non-zero
    exit, a record that says failed; the outputs written before are complete, the one that failed is absent."""
    out = tmp_path / "sim"
    args = [str(Path(sys.executable).parent / "cryohet"), "simulate", "--o", str(out)]
    args += [f"--{k}={v}" for k, v in SIM.items()]
    res = subprocess.run(args, env=dict(os.environ, CRYOHET_NO_PROGRESS="1"), capture_output=True, text=True,
                         timeout=120, preexec_fn=limit_file_size(LIMIT))
    failed = out / "maps" / "state_000.mrc"
    assert res.returncode == 4, res.stderr   # OutputError: one line, no traceback
    assert "Traceback" not in res.stderr
    assert f"{failed}: could not be written: file too large" in res.stderr.splitlines()[-1]
    record = json.loads((out / "cryohet_run.json").read_text())
    assert record["status"] == "failed" and f"{failed}: could not be written" in record["error"]
    assert open_stack(out / "particles.mrcs").shape == (20, 32, 32)           # complete: header and size agree
    assert len(starfile.read(out / "particles.star")["particles"]) == 20
    assert not failed.exists() and not (out / "ground_truth.npz").exists() and not temporaries(out)


def test_a_full_disk_while_replacing_outputs_keeps_the_old_ones_whole(tmp_path: Path) -> None:
    """The same run again over a finished one (--overwrite yes) with the limit: the map it could not write is
    still the old, complete one."""
    run_method(SIMULATE, SIM, tmp_path)
    old = (tmp_path / "maps" / "state_000.mrc").read_bytes()
    with file_size_limit(LIMIT), pytest.raises(OutputError, match="state_000.mrc: could not be written"):
        run_method(SIMULATE, {**SIM, "overwrite": True}, tmp_path)
    assert (tmp_path / "maps" / "state_000.mrc").read_bytes() == old
    assert read_map(tmp_path / "maps" / "state_001.mrc")[0].shape == (32, 32, 32)
    assert not temporaries(tmp_path)


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), value), "step": torch.tensor(3.0)}


def _value(path: Path) -> float:
    """What ``read_checkpoint`` reads here: the checkpoint's value (InputError when unusable)."""
    return float(read_weights(path)[0]["w"][0])


def test_tensors_read_back_are_aligned_whatever_the_metadata_length(tmp_path: Path) -> None:
    """In a safetensors file a tensor starts where the header's length puts it; read back, every tensor sits in
    fresh 64-byte aligned memory, so a product computed from it rounds as from the tensor that was written (BLAS
    kernels round differently on misaligned inputs: a resumed moments run differed in the last bit)."""
    w = torch.randn(4169, 272)
    c = torch.randn(1, 272)
    for pad in range(8):  # header lengths that leave the data at every offset modulo 64 bytes
        path = tmp_path / f"w{pad}.safetensors"
        write_weights(path, {"w": w}, {"format": "test", "note": "x" * pad})
        back = read_weights(path)[0]["w"]
        assert back.data_ptr() % 64 == 0
        assert torch.equal(c @ back.T, c @ w.T)


def test_a_checkpoint_keeps_the_previous_one_and_corruption_is_detected(tmp_path: Path, caplog) -> None:
    ckpt = tmp_path / "checkpoint.safetensors"
    for v in (1.0, 2.0, 3.0):
        write_weights(ckpt, _tensors(v), {"format": "test"}, checkpoint=True)
    assert _value(ckpt) == 3.0 and _value(previous_path(ckpt)) == 2.0
    log = logging.getLogger("test_faults")
    assert read_checkpoint(ckpt, _value, log) == (ckpt, 3.0)
    # one flipped byte in the data (the header still parses) is caught by the checksum
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(InputError, match="do not match the checksum"):
        read_weights(ckpt)
    # the owner reading it removes a killed writer's temporaries, sets the damaged one aside and uses the previous
    (tmp_path / ".checkpoint.safetensors.x1y2.part.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint(ckpt, _value, log) == (previous_path(ckpt), 2.0)
    assert "is unusable: corrupt" in caplog.text and "continuing from the previous checkpoint" in caplog.text
    assert not ckpt.exists() and (tmp_path / "checkpoint.unusable.safetensors").is_file() and not temporaries(tmp_path)
    # the next checkpoint does not push the good previous one out; no checkpoint at all reads as None
    write_weights(ckpt, _tensors(4.0), {"format": "test"}, checkpoint=True)
    assert _value(previous_path(ckpt)) == 2.0
    assert read_checkpoint(tmp_path / "none.safetensors", _value, log) is None


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_a_truncated_checkpoint_is_refused_naming_both_files(tmp_path: Path, cut: int) -> None:
    ckpt = tmp_path / "checkpoint.safetensors"
    write_weights(ckpt, _tensors(1.0), {"format": "test"})
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:cut])
    with pytest.raises(InputError, match="not a complete safetensors file: truncated or corrupt"):
        read_weights(ckpt)
    previous_path(ckpt).write_bytes(np.random.default_rng(0).bytes(len(data)))
    with pytest.raises(InputError, match=r"no usable checkpoint \(.*checkpoint\.safetensors: not a complete.*"
                                         r"checkpoint\.prev\.safetensors: not a complete"):
        read_checkpoint(ckpt, _value, logging.getLogger("test_faults"))
    assert ckpt.read_bytes() == data[:cut]   # nothing moved when nothing is usable


def test_remove_temporaries_touches_only_those_of_the_file(tmp_path: Path) -> None:
    keep = [tmp_path / n for n in ("checkpoint.safetensors", ".cryohet.lock", ".model.safetensors.a.part.safetensors")]
    gone = tmp_path / ".checkpoint.safetensors.k3j.part.safetensors"
    for p in [*keep, gone]:
        p.write_bytes(b"x")
    assert remove_temporaries(tmp_path / "checkpoint.safetensors") == [gone]
    assert all(p.exists() for p in keep)


def test_every_temporary_of_a_star_write_is_one_the_next_run_clears(tmp_path: Path, monkeypatch) -> None:
    """A run killed while ``write_star`` is under way (the CI failure of f6dc71d left ``.particles.star.*.body.star``)
    leaves only names that ``temporaries_under`` (the runner's clean-up) finds."""
    seen: list[list[Path]] = []
    real_write = starfile.write

    def write_and_look(*args, **kwargs):
        real_write(*args, **kwargs)
        seen.append(temporaries(tmp_path))
        assert seen[-1] == temporaries_under(tmp_path)

    monkeypatch.setattr(starfile, "write", write_and_look)
    write_star(tmp_path / "particles.star", {"particles": pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})})
    assert len(seen) == 1 and len(seen[0]) == 2          # the atomic temporary and the body written by starfile
    assert not temporaries(tmp_path) and (tmp_path / "particles.star").is_file()
