"""cryohet.io.mrc on real third-party files, our own writes (checked with RELION) and broken files."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryohet.errors import InputError
from cryohet.io.mrc import open_stack, read_map, stack_apix, write_map, write_stack

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "thirdparty" / "cryodrgn-tests"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name, box, apix", [("hand-vol.mrc", 64, 1.0), ("toymodel_small_nocenter.mrc", 30, 1.0)])
def test_read_cubic_maps(name: str, box: int, apix: float) -> None:
    vol, a = read_map(DATA / name)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    assert a == pytest.approx(apix)
    with mrcfile.open(DATA / name) as m:
        np.testing.assert_array_equal(vol, m.data)


@pytest.mark.parametrize("name, shape, apix", [("spike-vol.mrc", (128, 16, 16), 8.0),
                                               ("50S-vol.mrc", (128, 32, 32), 4.0)])
def test_odd_header_maps_refused_as_cubes_read_when_allowed(name: str, shape: tuple, apix: float) -> None:
    with pytest.raises(InputError) as e:
        read_map(DATA / name)
    msg = str(e.value)
    assert name in msg and "not a cube" in msg and f"{shape[2]} x {shape[1]} x {shape[0]}" in msg
    assert "stack of images" in msg
    vol, a = read_map(DATA / name, allow_noncubic=True)
    assert vol.shape == shape and a == pytest.approx(apix)
    # each 2-D section is normalised on its own: they are images, which is why a cube is refused
    assert np.abs(vol.mean(axis=(1, 2))).max() < 1e-5


@pytest.mark.filterwarnings("ignore:Map ID string not found:RuntimeWarning",
                            "ignore:Unrecognised machine stamp:RuntimeWarning")
@pytest.mark.parametrize("name, shape, header_apix", [
    ("hand.mrcs", (100, 64, 64), 1.0),
    ("relion31.mrcs", (5, 256, 256), 1.0),          # no 'MAP ' id string
    ("toy_projections.mrcs", (1000, 30, 30), 1.0),  # no 'MAP ' id, mx = my = mz = 1
    ("empiar_10076_7.mrc", (7, 320, 320), 0.0),     # voxel size 0 in the header
])
def test_open_real_stacks(name: str, shape: tuple, header_apix: float) -> None:
    stack = open_stack(DATA / name)
    assert isinstance(stack, np.memmap) and stack.shape == shape
    assert not stack.flags.writeable
    assert stack_apix(DATA / name) == pytest.approx(header_apix)
    with mrcfile.open(DATA / name, permissive=True) as m:
        np.testing.assert_array_equal(np.asarray(stack[-1]), m.data[-1])


def test_single_image_is_a_stack_of_one(tmp_path: Path) -> None:
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    with mrcfile.new(tmp_path / "one.mrc") as m:
        m.set_data(img)
    stack = open_stack(tmp_path / "one.mrc")
    assert stack.shape == (1, 6, 6)
    np.testing.assert_array_equal(stack[0], img)


def test_write_map_roundtrip_and_relion_reads_it(tmp_path: Path) -> None:
    vol = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    out = tmp_path / "vol.mrc"
    write_map(out, vol, 1.7)
    back, apix = read_map(out)
    np.testing.assert_array_equal(back, vol)
    assert apix == pytest.approx(1.7)
    with mrcfile.open(out) as m:  # strict mode: a standard MRC2014 file
        assert m.voxel_size.x == pytest.approx(1.7) and m.header.ispg == 1
    assert _leftovers(tmp_path) == ["vol.mrc"]
    res = subprocess.run(["relion_image_handler", "--i", str(out), "--stats"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert re.search(r"angpix = 1\.7\b", res.stdout), res.stdout
    assert "12 x 12 x 12" in res.stdout


def test_write_stack_relion_reads_it(tmp_path: Path) -> None:
    imgs = np.random.default_rng(1).normal(size=(3, 8, 8)).astype(np.float32)
    imgs[1] += 5.0
    out = tmp_path / "imgs.mrcs"
    write_stack(out, imgs, 2.5)
    stack = open_stack(out)
    np.testing.assert_array_equal(stack, imgs)
    assert stack_apix(out) == pytest.approx(2.5)
    res = subprocess.run(["relion_image_handler", "--i", str(out), "--stats"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    avgs = [float(x) for x in re.findall(r"avg= *([-0-9.e+]+)", res.stdout)]
    np.testing.assert_allclose(avgs, imgs.mean(axis=(1, 2)), atol=1e-4)
    assert res.stdout.count("angpix = 2.5") == 3


def test_axis_order_from_header(tmp_path: Path) -> None:
    vol = np.random.default_rng(2).normal(size=(6, 6, 6)).astype(np.float32)
    path = tmp_path / "swapped.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # stored as (x, y, z): sections along x
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
        m.voxel_size = 1.0
    back, _ = read_map(path)
    np.testing.assert_array_equal(back, vol)


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "vol.mrc"
    write_map(out, np.ones((4, 4, 4), np.float32), 1.0)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_map(out, np.array([[["x"] * 4] * 4] * 4, dtype=object), 1.0)  # fails while writing
    assert out.read_bytes() == before and _leftovers(tmp_path) == ["vol.mrc"]
    with pytest.raises(ValueError):
        write_stack(tmp_path / "new.mrcs", np.array([[["x"] * 4] * 4], dtype=object), 1.0)
    assert _leftovers(tmp_path) == ["vol.mrc"]


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_file() -> None:
    with pytest.raises(InputError) as e:
        open_stack(DATA / "no_such_stack.mrcs")
    assert "no_such_stack.mrcs" in str(e.value) and "file not found" in str(e.value)


def test_truncated_stack(tmp_path: Path) -> None:
    raw = (DATA / "hand.mrcs").read_bytes()
    bad = tmp_path / "hand_cut.mrcs"
    bad.write_bytes(raw[: len(raw) - 4096])
    with pytest.raises(InputError) as e:
        open_stack(bad)
    msg = str(e.value)
    assert "hand_cut.mrcs" in msg and "truncated" in msg and "100 x 64 x 64" in msg
    with pytest.raises(InputError, match="truncated"):
        read_map(bad, allow_noncubic=True)


def test_corrupt_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"this is not an MRC file " * 100)
    with pytest.raises(InputError) as e:
        open_stack(junk)
    assert "junk.mrcs" in str(e.value) and "corrupt" in str(e.value)
    short = tmp_path / "short.mrc"
    short.write_bytes((DATA / "hand-vol.mrc").read_bytes()[:300])
    with pytest.raises(InputError) as e:
        read_map(short)
    assert "short.mrc" in str(e.value) and "shorter than" in str(e.value)
    longer = tmp_path / "longer.mrcs"
    longer.write_bytes((DATA / "hand.mrcs").read_bytes() + b"\0" * 64)
    with pytest.raises(InputError, match="64 bytes more than its header describes"):
        open_stack(longer)


def test_non_square_images(tmp_path: Path) -> None:
    path = tmp_path / "rect.mrcs"
    write_stack(path, np.zeros((2, 8, 10), np.float32), 1.0)
    with pytest.raises(InputError) as e:
        open_stack(path)
    assert "rect.mrcs" in str(e.value) and "not square" in str(e.value) and "10 x 8" in str(e.value)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values:RuntimeWarning")
def test_nan_in_map(tmp_path: Path) -> None:
    vol = np.zeros((4, 4, 4), np.float32)
    vol[1, 2, 3] = np.nan
    path = tmp_path / "nan.mrc"
    shutil.copy(DATA / "toymodel_small_nocenter.mrc", tmp_path / "ok.mrc")
    write_map(path, vol, 1.0)
    with pytest.raises(InputError) as e:
        read_map(path)
    assert "nan.mrc" in str(e.value) and "NaN" in str(e.value)
    assert read_map(tmp_path / "ok.mrc")[0].shape == (30, 30, 30)
