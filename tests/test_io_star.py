"""cryohet.io.star on every third-party STAR file, writing 3.1 STAR read back by us and by RELION, bad input."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryohet.errors import InputError
from cryohet.io.star import read_particles_table, read_star, write_star

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "thirdparty" / "cryodrgn-tests"


@pytest.mark.parametrize("name, blocks", [
    ("relion31.star", {"optics": (1, 9), "particles": (5, 26)}),
    ("relion31.v2.star", {"optics": (1, 9), "particles": (5, 26)}),
    ("relion31.6opticsgroups.star", {"optics": (6, 18), "particles": (139, 23)}),
    ("relion5.star", {"optics": (1, 18), "particles": (17, 26)}),
    ("FinalRefinement-OriginalParticles-PfCRT.star", {"images": (5, 22)}),
    ("empiar_10076_7.star", {"": (7, 10)}),
    ("toy_projections.star", {"images": (1000, 9)}),
    ("sta_testing_bin8.star", {"": (219, 20)}),
])
def test_read_star_every_file(name: str, blocks: dict) -> None:
    got = read_star(DATA / name)
    assert {k: v.shape for k, v in got.items()} == blocks
    assert all(isinstance(v, pd.DataFrame) for v in got.values())


def test_relion31_and_v2_are_the_same_table() -> None:
    a, oa, va = read_particles_table(DATA / "relion31.star")
    b, ob, vb = read_particles_table(DATA / "relion31.v2.star")
    assert va == vb == "3.1"
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(oa, ob)
    # optics merged per particle; RELION uses rlnImagePixelSize (2.806), not rlnMicrographOriginalPixelSize
    assert (a["rlnImagePixelSize"] == 2.806).all() and (a["rlnMicrographOriginalPixelSize"] == 1.403).all()
    assert (a["rlnVoltage"] == 300).all() and (a["rlnImageSize"] == 256).all()
    assert a["rlnImageName"].tolist()[0] == "000001@relion31.mrcs"


def test_six_optics_groups_merge_per_particle() -> None:
    parts, optics, version = read_particles_table(DATA / "relion31.6opticsgroups.star")
    assert version == "3.1" and len(optics) == 6 and len(parts) == 139
    by_group = optics.set_index("rlnOpticsGroup")
    for col in ("rlnSphericalAberration", "rlnImagePixelSize", "rlnBeamTiltX", "rlnMagMat00", "rlnOpticsGroupName"):
        expected = by_group.loc[parts["rlnOpticsGroup"], col].to_numpy()
        np.testing.assert_array_equal(parts[col].to_numpy(), expected)
    # values really differ between groups: Cs 2.6 in group 4 only, pixel size 1.24 in groups 2 and 5
    cs = parts.groupby("rlnOpticsGroup")["rlnSphericalAberration"].first()
    assert cs[4] == 2.6 and set(cs.drop(4)) == {2.7}
    assert set(parts.loc[parts["rlnImagePixelSize"] == 1.24, "rlnOpticsGroup"]) == {2, 5}
    assert parts["rlnBeamTiltX"].nunique() == parts["rlnOpticsGroup"].nunique() > 1


def test_relion5_table() -> None:
    parts, optics, version = read_particles_table(DATA / "relion5.star")
    assert version == "5.0" and len(parts) == 17
    assert (parts["rlnImagePixelSize"] == 0.89).all() and (parts["rlnImageSize"] == 448).all()
    assert parts["rlnOddZernike"].iloc[0].startswith("[0.068")  # list-valued RELION 5 optics column kept
    assert {"rlnOriginXAngst", "rlnCtfBfactor", "rlnNrOfSignificantSamples"} <= set(parts.columns)


def test_relion30_pfcrt_pixel_size_and_origins() -> None:
    parts, optics, version = read_particles_table(DATA / "FinalRefinement-OriginalParticles-PfCRT.star")
    assert version == "3.0" and optics is None and len(parts) == 5
    # 3.0: pixel size = rlnDetectorPixelSize (µm) * 1e4 / rlnMagnification = 1.035 * 1e4 / 10000
    np.testing.assert_allclose(parts["rlnImagePixelSize"], 1.035)
    np.testing.assert_allclose(parts["rlnOriginXAngst"], parts["rlnOriginX"] * 1.035)
    np.testing.assert_allclose(parts["rlnOriginYAngst"].iloc[0], -0.04688 * 1.035)


def test_relion30_others() -> None:
    toy, optics, version = read_particles_table(DATA / "toy_projections.star")
    assert version == "3.0" and optics is None and len(toy) == 1000
    assert "dummyVariable" in toy.columns and "rlnImagePixelSize" not in toy.columns
    emp, _, _ = read_particles_table(DATA / "empiar_10076_7.star")
    np.testing.assert_allclose(emp["rlnImagePixelSize"], 5 * 1e4 / 38168)


def test_tilt_series_star_refused() -> None:
    with pytest.raises(InputError) as e:
        read_particles_table(DATA / "sta_testing_bin8.star")
    msg = str(e.value)
    assert "sta_testing_bin8.star" in msg and "tilt-series" in msg and "39 micrographs" in msg


def test_subtomogram_columns_refused(tmp_path: Path) -> None:
    blocks = read_star(DATA / "relion31.star")
    blocks["particles"]["rlnCoordinateZ"] = 100.0
    blocks["particles"]["rlnTomoName"] = "TS_01"
    write_star(tmp_path / "tomo.star", blocks)
    with pytest.raises(InputError) as e:
        read_particles_table(tmp_path / "tomo.star")
    assert "tomo.star" in str(e.value) and "subtomogram" in str(e.value) and "rlnTomoName" in str(e.value)


def test_write_star_roundtrip_version_lines_and_atomic(tmp_path: Path) -> None:
    blocks = read_star(DATA / "relion5.star")
    blocks["particles"]["cryohetZ1"] = np.linspace(-1, 1, 17) * 1e-7 + 123.456789
    out = tmp_path / "out.star"
    write_star(out, blocks)
    text = out.read_text().splitlines()
    assert [text[i - 2] for i, line in enumerate(text) if line.startswith("data_")] == ["# version 30001"] * 2
    back = read_star(out)
    for name in ("optics", "particles"):
        assert list(back[name].columns) == list(blocks[name].columns)
        for col in blocks[name].columns:
            a, b = blocks[name][col], back[name][col]
            if pd.api.types.is_numeric_dtype(a):
                np.testing.assert_allclose(b.to_numpy(np.float64), a.to_numpy(np.float64), rtol=1e-9)
            else:
                assert b.astype(str).tolist() == a.astype(str).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]


def test_write_star_failure_leaves_old_file(tmp_path: Path) -> None:
    out = tmp_path / "keep.star"
    write_star(out, {"particles": pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})})
    before = out.read_bytes()
    with pytest.raises(ValueError, match="invalid STAR labels"):
        write_star(out, {"particles": pd.DataFrame({"bad label": [1]})})
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.star"]


def test_relion_star_handler_reads_our_star(tmp_path: Path) -> None:
    blocks = read_star(DATA / "relion31.6opticsgroups.star")
    blocks["particles"]["cryohetZ1"] = np.arange(139, dtype=np.float64) / 10
    ours = tmp_path / "ours.star"
    write_star(ours, blocks)
    sel = tmp_path / "sel.star"
    res = subprocess.run(["relion_star_handler", "--i", str(ours), "--o", str(sel), "--select", "rlnOpticsGroup",
                          "--minval", "4", "--maxval", "4"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    parts, optics, _ = read_particles_table(sel)
    expected = blocks["particles"][blocks["particles"]["rlnOpticsGroup"] == 4]
    assert len(parts) == len(expected) > 0
    np.testing.assert_allclose(parts["cryohetZ1"], expected["cryohetZ1"])  # RELION kept our extra column
    assert (parts["rlnSphericalAberration"] == 2.6).all()


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_and_garbage_star(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        read_particles_table(tmp_path / "none.star")
    assert "none.star" in str(e.value) and "file not found" in str(e.value)
    junk = tmp_path / "junk.star"
    junk.write_bytes((DATA / "hand.mrcs").read_bytes()[:3000])
    with pytest.raises(InputError) as e:
        read_star(junk)
    assert "junk.star" in str(e.value) and "no data blocks" in str(e.value)


def test_optics_without_particles_and_unknown_group(tmp_path: Path) -> None:
    blocks = read_star(DATA / "relion31.star")
    write_star(tmp_path / "optics_only.star", {"optics": blocks["optics"]})
    with pytest.raises(InputError, match="no data_particles block"):
        read_particles_table(tmp_path / "optics_only.star")
    blocks["particles"].loc[2, "rlnOpticsGroup"] = 7
    write_star(tmp_path / "group7.star", blocks)
    with pytest.raises(InputError) as e:
        read_particles_table(tmp_path / "group7.star")
    assert "group7.star" in str(e.value) and "optics groups [7]" in str(e.value)
