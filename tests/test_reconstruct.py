"""cryohet reconstruct against relion_reconstruct on images that relion_project made."""
from __future__ import annotations

import json
import shutil

import mrcfile
import numpy as np
import pytest
import torch
from relion_tools import THIRDPARTY, pose_ctf_star, relion

from cryohet.cli import main
from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.io.mrc import read_map, write_map
from cryohet.io.star import read_star
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at

APIX = 2.0


@pytest.fixture(scope="module")
def relion_data(tmp_path_factory):
    """2000 noisy CTF-affected images of hand-vol.mrc by relion_project, and relion_reconstruct's map."""
    d = tmp_path_factory.mktemp("relion_rec")
    vol, _ = read_map(THIRDPARTY / "hand-vol.mrc")
    write_map(d / "truth.mrc", vol, APIX)
    pose_ctf_star(d / "ang.star", 2000, vol.shape[0], APIX, seed=7)
    relion("relion_project", "--i", "truth.mrc", "--o", "sim", "--ang", "ang.star", "--ctf", "--angpix", str(APIX),
           "--add_noise", "--white_noise", "2.0", cwd=d)
    relion("relion_reconstruct", "--i", "sim.star", "--o", "relion.mrc", "--ctf", "--angpix", str(APIX), cwd=d)
    return d


def test_reconstruct_matches_relion(relion_data, tmp_path):
    d = relion_data
    out = tmp_path / "rec"
    assert main(["reconstruct", "--particles", str(d / "sim.star"), "--o", str(out)]) == 0
    ours, apix = read_map(out / "map.mrc")
    assert apix == pytest.approx(APIX)
    theirs, _ = read_map(d / "relion.mrc")
    truth, _ = read_map(d / "truth.mrc")
    box = ours.shape[0]
    agreement = fsc(ours, theirs)
    assert agreement[: int(0.75 * box // 2) + 1].min() >= 0.95, agreement
    ours_auc, theirs_auc = fsc_auc(fsc(ours, truth)), fsc_auc(fsc(theirs, truth))
    assert ours_auc >= theirs_auc - 0.005, (ours_auc, theirs_auc)
    # half-maps, FSC and the record
    record = json.loads((out / "cryohet_run.json").read_text())
    assert record["status"] == "finished"
    kinds = sorted(o["kind"] for o in record["outputs"])
    assert kinds == ["fsc", "half_map", "half_map", "particles_star", "plot", "plot", "volume"]
    h1, _ = read_map(out / "half1.mrc")
    h2, _ = read_map(out / "half2.mrc")
    curve = fsc(h1, h2)
    table = read_star(out / "fsc.star")
    assert np.allclose(table["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"], curve, atol=1e-4)
    res = resolution_at(curve, box, APIX)
    assert 2 * APIX <= res < 12, res
    assert float(table["general"]["rlnFinalResolution"].iloc[0]) == pytest.approx(res, rel=1e-4)
    assert (out / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parts = read_star(out / "particles.star")["particles"]
    sim = read_star(d / "sim.star")["particles"]
    assert list(parts["rlnImageName"].str.split("@").str[0]) == list(sim["rlnImageName"].str.split("@").str[0])
    assert (parts["rlnRandomSubset"].to_numpy() == read_star(d / "ang.star")["particles"]["rlnRandomSubset"]).all()


def test_reconstruct_downsampled_box_and_mask(relion_data, tmp_path):
    d = relion_data
    mask = np.zeros((32, 32, 32), np.float32)
    mask[4:28, 4:28, 4:28] = 1
    write_map(tmp_path / "mask.mrc", mask, 2 * APIX)
    out = tmp_path / "rec32"
    assert main(["reconstruct", "--particles", str(d / "sim.star"), "--o", str(out), "--box", "32",
                 "--mask", str(tmp_path / "mask.mrc"), "--wiener", "none"]) == 0
    ours, apix = read_map(out / "map.mrc")
    assert ours.shape == (32, 32, 32) and apix == pytest.approx(2 * APIX)


    truth = fourier_crop_3d(torch.as_tensor(read_map(d / "truth.mrc")[0]), 32).numpy()
    assert fsc(ours, truth)[:12].min() > 0.8
    table = read_star(out / "fsc.star")["fsc"]
    assert "rlnFourierShellCorrelationMaskedMaps" in table


@pytest.mark.parametrize("args, message", [
    (["--wiener", "-1"], "--wiener"),
    (["--box", "33"], "--box"),
    (["--box", "128"], "--box"),
])
def test_reconstruct_bad_parameters(relion_data, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["reconstruct", "--particles", str(relion_data / "sim.star"), "--o", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "map.mrc").exists()


def test_reconstruct_mask_of_another_box(relion_data, tmp_path, capsys):
    write_map(tmp_path / "mask.mrc", np.ones((16, 16, 16), np.float32), APIX)
    out = tmp_path / "bad"
    assert main(["reconstruct", "--particles", str(relion_data / "sim.star"), "--o", str(out),
                 "--mask", str(tmp_path / "mask.mrc")]) == 2
    err = capsys.readouterr().err
    assert "mask.mrc" in err and "box" in err
    assert not (out / "map.mrc").exists()


def test_reconstruct_nan_image_fails_cleanly(relion_data, tmp_path, capsys):
    """A NaN deep in the stack stops the run with the stack named, exit 2, and no map written."""
    for name in ("sim.star", "sim.mrcs"):
        shutil.copy(relion_data / name, tmp_path / name)
    (tmp_path / "sim.mrcs").chmod(0o644)
    with mrcfile.mmap(tmp_path / "sim.mrcs", mode="r+") as m:
        m.data[1500, 10, 10] = np.nan
    out = tmp_path / "out"
    assert main(["reconstruct", "--particles", str(tmp_path / "sim.star"), "--o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sim.mrcs" in err and "NaN" in err
    assert not any(out.glob("*.mrc")) and json.loads((out / "cryohet_run.json").read_text())["status"] == "failed"


def test_insertion_within_a_radius_fills_the_grid_there_as_a_full_one():
    """``BackProjector.insert(radius_px=r)`` (classification's early iterations): every voxel well inside r
    gets what a full insertion gives it (rounded shells, and a sample's trilinear corners reach up to √3/2 px
    beyond it: r − 2); nothing lands beyond r + 1."""
    from cryohet.geometry.backproject import BackProjector

    box, r = 32, 6.0
    g = torch.Generator().manual_seed(0)
    F = torch.randn(40, box, box, dtype=torch.complex64, generator=g)
    ctf = torch.rand(40, box, box, generator=g)
    A = torch.linalg.qr(torch.randn(40, 3, 3, generator=g))[0]
    A = A * torch.linalg.det(A)[:, None, None]
    full, part = BackProjector(box), BackProjector(box)
    full.insert(F, ctf, A)
    part.insert(F, ctf, A, radius_px=r)
    shells = full.shell_index()
    inner, outer = shells <= r - 2, shells > r + 1
    np.testing.assert_allclose(part.weight[inner].numpy(), full.weight[inner].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part._data[inner].numpy(), full._data[inner].numpy(), rtol=1e-5, atol=1e-5)
    assert full.weight[outer].abs().sum() > 0 and part.weight[outer].abs().sum() == 0
