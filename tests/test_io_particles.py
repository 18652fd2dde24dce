"""cryohet.io.particles: loading real STAR / .cs files, image access, writing RELION 3.1 STAR (checked with
relion_project / relion_reconstruct), and each kind of bad input."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryohet.errors import InputError
from cryohet.io.mrc import read_map, write_stack
from cryohet.io.particles import ParticleSet, load_particles, write_particles_star
from cryohet.io.star import read_particles_table, read_star, write_star

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "thirdparty" / "cryodrgn-tests"


def raw_images(path: Path) -> np.ndarray:
    """The images as mrcfile reads them (permissive: RELION's stacks lack the 'MAP ' id)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return np.asarray(m.data, dtype=np.float32).copy()


def copy_data(dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(DATA / n, dst / n)
    return dst


# ------------------------------------------------------------------------------------------- real files

def test_relion31_particles() -> None:
    ps = load_particles(DATA / "relion31.star")
    table, _, _ = read_particles_table(DATA / "relion31.star")
    assert len(ps) == 5 and ps.box == 256
    assert ps.apix == pytest.approx(2.806)  # from rlnImagePixelSize; the stack header says 1.0
    assert ps.stack_paths == [DATA / "relion31.mrcs"]
    np.testing.assert_array_equal(ps.stack_index, np.arange(5))
    np.testing.assert_allclose(ps.euler_deg, table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    np.testing.assert_allclose(ps.shift_A, table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    np.testing.assert_allclose(ps.ctf.defocus_u_A, table["rlnDefocusU"])
    assert set(ps.ctf.voltage_kV) == {300.0} and set(ps.ctf.cs_mm) == {0.01} and set(ps.ctf.amp_contrast) == {0.1}
    assert list(ps.table.columns) == list(read_star(DATA / "relion31.star")["particles"].columns)
    assert ps.optics is not None and len(ps.optics) == 1
    imgs = ps.images(np.array([4, 0, 4]))
    assert imgs.dtype == np.float32 and imgs.shape == (3, 256, 256)
    raw = raw_images(DATA / "relion31.mrcs")
    np.testing.assert_array_equal(imgs, raw[[4, 0, 4]])
    v2 = load_particles(DATA / "relion31.v2.star")
    np.testing.assert_array_equal(v2.euler_deg, ps.euler_deg)
    np.testing.assert_array_equal(v2.images(slice(None)), raw)


def test_relion5_particles() -> None:
    ps = load_particles(DATA / "relion5.star", check_images=False)
    assert len(ps) == 17 and ps.box == 448 and ps.apix == pytest.approx(0.89)
    assert [p.name for p in ps.stack_paths] == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    assert np.isfinite(ps.euler_deg).all() and ps.ctf.phase_shift_deg.shape == (17,)
    with pytest.raises(InputError) as e:
        load_particles(DATA / "relion5.star")
    assert "toy_images_a.mrcs" in str(e.value) and "image stack not found" in str(e.value)
    assert "relion5.star" in str(e.value)


def test_six_optics_groups(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        load_particles(DATA / "relion31.6opticsgroups.star", check_images=False)
    msg = str(e.value)
    assert "relion31.6opticsgroups.star" in msg and "different pixel sizes" in msg and "group 2: 1.24" in msg
    # the groups that share 1.25 Å load together, each particle with its own group's optics
    blocks = read_star(DATA / "relion31.6opticsgroups.star")
    same = blocks["optics"].loc[blocks["optics"]["rlnImagePixelSize"] == 1.25, "rlnOpticsGroup"]
    blocks["particles"] = blocks["particles"][blocks["particles"]["rlnOpticsGroup"].isin(same)].reset_index(drop=True)
    write_star(tmp_path / "same_apix.star", blocks)
    ps = load_particles(tmp_path / "same_apix.star", check_images=False)
    groups = ps.table["rlnOpticsGroup"].to_numpy()
    assert ps.apix == pytest.approx(1.25) and ps.box == 196 and set(groups) == {1, 3, 4, 6}
    np.testing.assert_array_equal(ps.ctf.cs_mm, np.where(groups == 4, 2.6, 2.7))
    assert set(ps.ctf.voltage_kV) == {200.0}


def test_relion30_pfcrt(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        load_particles(DATA / "FinalRefinement-OriginalParticles-PfCRT.star", check_images=False)
    assert "no CTF parameters" in str(e.value) and "rlnAmplitudeContrast" in str(e.value)
    blocks = read_star(DATA / "FinalRefinement-OriginalParticles-PfCRT.star")
    blocks["images"]["rlnAmplitudeContrast"] = 0.1
    write_star(tmp_path / "pfcrt.star", blocks, version=None)
    ps = load_particles(tmp_path / "pfcrt.star", check_images=False)
    assert ps.source_format == "relion3.0" and ps.optics is None and len(ps) == 5
    assert ps.apix == pytest.approx(1.035)  # rlnDetectorPixelSize 1.035 µm * 1e4 / rlnMagnification 10000
    np.testing.assert_allclose(ps.shift_A, blocks["images"][["rlnOriginX", "rlnOriginY"]].to_numpy() * 1.035)
    np.testing.assert_allclose(ps.euler_deg[0], [16.093530, 86.352776, 98.225690])
    assert ps.stack_paths[0] == tmp_path / "Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs"
    with pytest.raises(InputError, match="image stack not found"):
        load_particles(tmp_path / "pfcrt.star")


def test_toy_projections_no_poses() -> None:
    with pytest.raises(InputError) as e:
        load_particles(DATA / "toy_projections.star")
    msg = str(e.value)
    assert "toy_projections.star" in msg and "no particle poses" in msg
    assert "rlnAngleRot" in msg and "rlnAngleTilt" in msg and "rlnAnglePsi" in msg
    ps = load_particles(DATA / "toy_projections.star", require_poses=False)
    assert len(ps) == 1000 and ps.box == 30 and ps.apix == 1.0  # no pixel size in the STAR: header value
    assert np.isnan(ps.euler_deg).all()
    raw = raw_images(DATA / "toy_projections.mrcs")
    for start in range(0, 1000, 300):
        idx = np.arange(start, min(start + 300, 1000))
        imgs = ps.images(idx)
        assert imgs.shape == (len(idx), 30, 30)
        np.testing.assert_array_equal(imgs, raw[idx])
    sub = ps.subset(np.arange(10, 20))
    np.testing.assert_array_equal(sub.images(slice(None)), raw[10:20])
    assert sub.table["rlnImageName"].iloc[0] == "000011@toy_projections.mrcs"


def test_empiar_star_and_cs_agree() -> None:
    st = load_particles(DATA / "empiar_10076_7.star", require_poses=False)
    cs = load_particles(DATA / "empiar_10076_7.cs", require_poses=False)
    assert len(st) == len(cs) == 7 and st.box == cs.box == 320
    # pixel size from the metadata (5 µm / 38168 = 1.31 Å), not the header (0)
    assert st.apix == pytest.approx(1.31, abs=1e-4) and cs.apix == pytest.approx(st.apix, rel=1e-6)
    for f in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amp_contrast",
              "phase_shift_deg", "bfactor_A2", "scale"):
        np.testing.assert_allclose(getattr(cs.ctf, f), getattr(st.ctf, f), rtol=1e-6, atol=1e-4, err_msg=f)
    assert st.stack_paths == cs.stack_paths == [DATA / "empiar_10076_7.mrc"]
    np.testing.assert_array_equal(cs.images(slice(None)), st.images(slice(None)))
    np.testing.assert_array_equal(st.images([6])[0], raw_images(DATA / "empiar_10076_7.mrc")[6])
    for path in ("empiar_10076_7.star", "empiar_10076_7.cs"):  # neither file has poses
        with pytest.raises(InputError, match="poses"):
            load_particles(DATA / path)


def test_cryosparc_p12_and_refusals() -> None:
    ps = load_particles(DATA / "cryosparc_P12_J24_001_particles.cs", check_images=False)
    assert len(ps) == 2019 and ps.box == 180 and ps.apix == pytest.approx(2.95)
    assert np.isfinite(ps.euler_deg).all() and ps.source_format == "cryosparc" and ps.optics is None
    assert "alignments3D/pose/0" in ps.table.columns and len(ps.stack_paths) > 1
    with pytest.raises(InputError, match="image stack not found"):
        load_particles(DATA / "cryosparc_P12_J24_001_particles.cs")
    with pytest.raises(InputError) as e:
        load_particles(DATA / "cryosparc_J2_particles_exported.cs", check_images=False)
    assert "cryosparc_J2_particles_exported.cs" in str(e.value) and "no 3-D poses" in str(e.value)
    with pytest.raises(InputError) as e:
        load_particles(DATA / "sta_testing_bin8.star", check_images=False)
    assert "sta_testing_bin8.star" in str(e.value) and "tilt-series" in str(e.value)


# ----------------------------------------------------------------------------------------- path rules

def _mini_star(path: Path, names: list[str], n_extra_cols: dict | None = None) -> Path:
    n = len(names)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [30], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": np.linspace(0, 90, n),
                          "rlnAngleTilt": np.full(n, 45.0), "rlnAnglePsi": np.zeros(n),
                          "rlnOriginXAngst": np.zeros(n), "rlnOriginYAngst": np.zeros(n),
                          "rlnDefocusU": np.full(n, 1e4), "rlnDefocusV": np.full(n, 1e4),
                          "rlnDefocusAngle": np.zeros(n), "rlnOpticsGroup": np.ones(n, int), **(n_extra_cols or {})})
    write_star(path, {"optics": optics, "particles": parts})
    return path


def test_image_paths_resolved_like_relion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = raw_images(DATA / "toy_projections.mrcs")
    project = tmp_path / "project"
    copy_data(project / "Extract" / "job001", "toy_projections.mrcs")
    # 1) relative to the current folder (the RELION project), the STAR file elsewhere
    star = _mini_star(project / "Refine3D" / "job002" / "run_data.star", ["3@Extract/job001/toy_projections.mrcs"])
    monkeypatch.chdir(project)
    ps = load_particles(star)
    assert ps.stack_paths == [project / "Extract/job001/toy_projections.mrcs"]
    np.testing.assert_array_equal(ps.images([0])[0], raw[2])  # N@ is 1-based
    # 2) beside the STAR file, from any current folder
    star2 = _mini_star(project / "Extract" / "job001" / "local.star", ["7@toy_projections.mrcs"])
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load_particles(star2).images([0])[0], raw[6])
    with pytest.raises(InputError, match="image stack not found"):  # case 1 from outside the project
        load_particles(star)
    # 3) datadir: as written, or by base name
    np.testing.assert_array_equal(load_particles(star, datadir=project).images([0])[0], raw[2])
    np.testing.assert_array_equal(load_particles(star, datadir=project / "Extract/job001").images([0])[0], raw[2])
    # 4) absolute paths as they are
    star4 = _mini_star(tmp_path / "abs.star", [f"1000@{DATA / 'toy_projections.mrcs'}"])
    np.testing.assert_array_equal(load_particles(star4).images([0])[0], raw[999])


def test_many_stacks(tmp_path: Path) -> None:
    copy_data(tmp_path, "toy_projections.mrcs")
    rng = np.random.default_rng(3)
    second = rng.normal(size=(4, 30, 30)).astype(np.float32)
    write_stack(tmp_path / "second.mrcs", second, 1.5)
    names = ["2@toy_projections.mrcs", "1@second.mrcs", "4@second.mrcs", "1000@toy_projections.mrcs"]
    ps = load_particles(_mini_star(tmp_path / "two.star", names))
    assert [p.name for p in ps.stack_paths] == ["toy_projections.mrcs", "second.mrcs"]
    np.testing.assert_array_equal(ps.stack_id, [0, 1, 1, 0])
    np.testing.assert_array_equal(ps.stack_index, [1, 0, 3, 999])
    raw = raw_images(DATA / "toy_projections.mrcs")
    np.testing.assert_array_equal(ps.images([3, 1, 2, 0]), np.stack([raw[999], second[0], second[3], raw[1]]))
    clone = pickle.loads(pickle.dumps(ps))  # e.g. to DataLoader workers: memmaps are re-opened there
    np.testing.assert_array_equal(clone.images([2]), second[3:4])
    sub = ps.subset([1, 2])
    assert [p.name for p in sub.stack_paths] == ["second.mrcs"]
    np.testing.assert_array_equal(sub.images(slice(None)), second[[0, 3]])


# ------------------------------------------------------------------------------------------ bad input

def test_missing_ctf_columns(tmp_path: Path) -> None:
    copy_data(tmp_path, "relion31.mrcs")
    blocks = read_star(DATA / "relion31.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusV"])
    blocks["optics"] = blocks["optics"].drop(columns=["rlnVoltage"])
    write_star(tmp_path / "noctf.star", blocks)
    with pytest.raises(InputError) as e:
        load_particles(tmp_path / "noctf.star")
    msg = str(e.value)
    assert "noctf.star" in msg and "no CTF parameters" in msg and "rlnDefocusV" in msg and "rlnVoltage" in msg


def test_missing_pose_columns(tmp_path: Path) -> None:
    copy_data(tmp_path, "relion31.mrcs")
    blocks = read_star(DATA / "relion31.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleTilt"])
    write_star(tmp_path / "nopose.star", blocks)
    with pytest.raises(InputError) as e:
        load_particles(tmp_path / "nopose.star")
    assert "nopose.star" in str(e.value) and "missing column(s) rlnAngleTilt" in str(e.value)


def test_index_past_end_of_stack(tmp_path: Path) -> None:
    copy_data(tmp_path, "relion31.mrcs")
    blocks = read_star(DATA / "relion31.star")
    blocks["particles"].loc[3, "rlnImageName"] = "000006@relion31.mrcs"
    write_star(tmp_path / "past.star", blocks)
    with pytest.raises(InputError) as e:
        load_particles(tmp_path / "past.star")
    msg = str(e.value)
    assert "relion31.mrcs" in msg and "image index 6" in msg and "holds 5 images" in msg and "past.star" in msg
    ps = load_particles(tmp_path / "past.star", check_images=False)  # found again when the image is read
    with pytest.raises(InputError, match="relion31.mrcs: particles refer to image 6 .* the stack holds 5 images"):
        ps.images([3])


def test_stacks_of_different_box_sizes(tmp_path: Path) -> None:
    copy_data(tmp_path, "toy_projections.mrcs", "hand.mrcs")
    star = _mini_star(tmp_path / "mixed.star", ["1@toy_projections.mrcs", "1@hand.mrcs"])
    with pytest.raises(InputError) as e:
        load_particles(star)
    msg = str(e.value)
    assert "mixed.star" in msg and "different box sizes" in msg and "30 px" in msg and "64 px: hand.mrcs" in msg
    star2 = _mini_star(tmp_path / "hand_only.star", ["1@hand.mrcs"])  # rlnImageSize 30 but images 64
    with pytest.raises(InputError, match="images are 64 px but the metadata .* says rlnImageSize 30"):
        load_particles(star2)


def test_non_square_stack(tmp_path: Path) -> None:
    write_stack(tmp_path / "rect.mrcs", np.zeros((2, 30, 32), np.float32), 1.5)
    star = _mini_star(tmp_path / "rect.star", ["1@rect.mrcs"])
    with pytest.raises(InputError) as e:
        load_particles(star)
    assert "rect.mrcs" in str(e.value) and "not square" in str(e.value)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values:RuntimeWarning")
def test_nan_in_images(tmp_path: Path) -> None:
    imgs = np.random.default_rng(4).normal(size=(4, 30, 30)).astype(np.float32)
    imgs[2, 5, 5] = np.nan
    imgs[3, 0, 0] = np.inf
    write_stack(tmp_path / "nan.mrcs", imgs, 1.5)
    ps = load_particles(_mini_star(tmp_path / "nan.star", [f"{i}@nan.mrcs" for i in (1, 2, 3, 4)]))
    np.testing.assert_array_equal(ps.images([0, 1]), imgs[:2])
    with pytest.raises(InputError) as e:
        ps.images([1, 2])
    msg = str(e.value)
    assert "nan.mrcs" in msg and "image 3 (particle 2)" in msg and "NaN" in msg
    with pytest.raises(InputError, match="image 4 \\(particle 3\\)"):
        ps.images([3])


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        load_particles(tmp_path / "absent.star")
    assert "absent.star" in str(e.value) and "file not found" in str(e.value)
    star = _mini_star(tmp_path / "dangling.star", ["1@gone.mrcs"])
    with pytest.raises(InputError) as e:
        load_particles(star)
    assert "gone.mrcs" in str(e.value) and "image stack not found" in str(e.value) and "dangling.star" in str(e.value)
    with pytest.raises(InputError, match="unknown particle file type"):
        load_particles(DATA / "hand.mrcs")
    with pytest.raises(InputError, match="data folder not found"):
        load_particles(star, datadir=tmp_path / "nowhere")


# -------------------------------------------------------------------------------------------- writing

def test_write_relion31_roundtrip_with_extras_and_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ps = load_particles(DATA / "relion31.star")
    z = np.arange(10, dtype=np.float64).reshape(5, 2) / 3
    rows = np.array([True, False, True, True, False])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "with_z.star"
    write_particles_star(out, ps, extra_columns={"cryohetZ1": z[:, 0], "cryohetZ2": z[:, 1]}, rows=rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["with_z.cs", "with_z.star"]  # and its cryoSPARC twin
    parts, optics, version = read_particles_table(out)
    assert version == "3.1"
    orig = read_star(DATA / "relion31.star")
    assert list(parts.columns[:26]) == list(orig["particles"].columns)
    written = read_star(out)
    assert list(written["particles"].columns) == list(orig["particles"].columns) + ["cryohetZ1", "cryohetZ2"]
    pd.testing.assert_frame_equal(written["optics"], orig["optics"])
    keep = orig["particles"][rows].reset_index(drop=True)
    for col in orig["particles"].columns:
        if col == "rlnImageName":
            continue
        a, b = keep[col], written["particles"][col]
        if pd.api.types.is_numeric_dtype(a):
            np.testing.assert_allclose(b.to_numpy(np.float64), a.to_numpy(np.float64), rtol=1e-9, err_msg=col)
        else:
            assert b.astype(str).tolist() == a.astype(str).tolist(), col
    np.testing.assert_allclose(written["particles"]["cryohetZ2"], z[rows, 1], rtol=1e-9)
    # images: absolute paths (the original relative name does not resolve from this folder)
    assert written["particles"]["rlnImageName"].tolist() == [f"{i:06d}@{DATA / 'relion31.mrcs'}" for i in (1, 3, 4)]
    back = load_particles(out)
    np.testing.assert_array_equal(back.images(slice(None)), raw_images(DATA / "relion31.mrcs")[[0, 2, 3]])
    np.testing.assert_allclose(back.euler_deg, ps.euler_deg[rows])


def test_write_keeps_relative_names_that_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_data(tmp_path, "relion31.star", "relion31.mrcs")
    monkeypatch.chdir(tmp_path)
    ps = load_particles("relion31.star")
    write_particles_star("Select/job003/particles.star", ps, rows=[1, 2])
    names = read_star(tmp_path / "Select/job003/particles.star")["particles"]["rlnImageName"].tolist()
    assert names == ["000002@relion31.mrcs", "000003@relion31.mrcs"]  # project-relative, as RELION writes
    np.testing.assert_array_equal(load_particles("Select/job003/particles.star").images([1])[0],
                                  raw_images(DATA / "relion31.mrcs")[2])


def test_write_relion30_input_as_31(tmp_path: Path) -> None:
    copy_data(tmp_path, "toy_projections.mrcs")
    blocks = read_star(DATA / "toy_projections.star")
    t = blocks["images"].iloc[:40].copy()
    rng = np.random.default_rng(5)
    t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"] = (rng.uniform(-180, 180, 40), rng.uniform(0, 180, 40),
                                                             rng.uniform(-180, 180, 40))
    t["rlnOriginX"], t["rlnOriginY"] = rng.normal(size=40), rng.normal(size=40)
    t["rlnMagnification"], t["rlnDetectorPixelSize"] = 10000.0, 2.0
    write_star(tmp_path / "v30.star", {"images": t}, version=None)
    ps = load_particles(tmp_path / "v30.star")
    assert ps.source_format == "relion3.0" and ps.apix == pytest.approx(2.0)
    np.testing.assert_allclose(ps.shift_A, t[["rlnOriginX", "rlnOriginY"]].to_numpy() * 2.0)
    out = tmp_path / "v31.star"
    write_particles_star(out, ps, extra_columns={"cryohetZ1": np.arange(40.0)})
    blocks31 = read_star(out)
    optics, parts = blocks31["optics"], blocks31["particles"]
    assert len(optics) == 1 and optics["rlnImagePixelSize"].iloc[0] == 2.0 and optics["rlnImageSize"].iloc[0] == 30
    assert optics["rlnVoltage"].iloc[0] == 300 and optics["rlnSphericalAberration"].iloc[0] == pytest.approx(0.001)
    for gone in ("rlnOriginX", "rlnOriginY", "rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize"):
        assert gone not in parts.columns
    for kept in ("dummyVariable", "rlnPhaseShift", "rlnDefocusU", "rlnAngleRot", "cryohetZ1"):
        assert kept in parts.columns
    back = load_particles(out)
    assert back.source_format == "relion3.1" and back.apix == pytest.approx(2.0)
    np.testing.assert_allclose(back.shift_A, ps.shift_A, rtol=1e-9)
    np.testing.assert_allclose(back.euler_deg, ps.euler_deg, rtol=1e-9)
    np.testing.assert_allclose(back.ctf.phase_shift_deg, 90.0)
    np.testing.assert_array_equal(back.images(slice(None)), ps.images(slice(None)))


def test_write_from_cryosparc(tmp_path: Path) -> None:
    ps = load_particles(DATA / "cryosparc_P12_J24_001_particles.cs", check_images=False)
    out = tmp_path / "p12.star"
    write_particles_star(out, ps, rows=slice(0, 100))
    parts, optics, version = read_particles_table(out)
    assert version == "3.1" and len(parts) == 100
    np.testing.assert_allclose(parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], ps.euler_deg[:100], atol=1e-6)
    np.testing.assert_allclose(parts[["rlnOriginXAngst", "rlnOriginYAngst"]], ps.shift_A[:100], atol=1e-6)
    np.testing.assert_allclose(parts["rlnDefocusAngle"], ps.ctf.defocus_angle_deg[:100], atol=1e-6)
    assert set(parts["rlnRandomSubset"]) == {1, 2} and (parts["rlnImagePixelSize"] == 2.95).all()
    emp = load_particles(DATA / "empiar_10076_7.cs", require_poses=False)
    write_particles_star(tmp_path / "emp.star", emp)
    back = load_particles(tmp_path / "emp.star", require_poses=False)
    np.testing.assert_array_equal(back.images(slice(None)), emp.images(slice(None)))
    np.testing.assert_allclose(back.ctf.defocus_u_A, emp.ctf.defocus_u_A)


def test_failed_write_leaves_old_file(tmp_path: Path) -> None:
    ps = load_particles(DATA / "relion31.star")
    out = tmp_path / "p.star"
    write_particles_star(out, ps)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="has 3 values"):
        write_particles_star(out, ps, extra_columns={"cryohetZ1": np.zeros(3)})
    with pytest.raises(ValueError, match="invalid STAR labels"):
        write_particles_star(out, ps, extra_columns={"bad name": np.zeros(5)})
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.cs", "p.star"]


# ------------------------------------------------------------------------------- RELION reads what we write

@pytest.fixture(scope="module")
def relion_projections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 CTF-modulated projections of the 30^3 toy model made by relion_project from a STAR we wrote."""
    d = tmp_path_factory.mktemp("relion_sim")
    shutil.copy(DATA / "toymodel_small_nocenter.mrc", d / "model.mrc")
    rng = np.random.default_rng(6)
    n = 60
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [30], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnAngleRot": rng.uniform(-180, 180, n),
                          "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                          "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 1, n),
                          "rlnOriginYAngst": rng.normal(0, 1, n), "rlnDefocusU": rng.uniform(4000, 8000, n),
                          "rlnDefocusAngle": np.full(n, 20.0), "rlnOpticsGroup": np.ones(n, int)})
    parts["rlnDefocusV"] = parts["rlnDefocusU"] - 200
    write_star(d / "angles.star", {"optics": optics, "particles": parts})
    res = subprocess.run(["relion_project", "--i", "model.mrc", "--ang", "angles.star", "--o", "proj", "--ctf"],
                         cwd=d, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (d / "proj.star").is_file(), res.stdout[-2000:] + res.stderr[-2000:]
    return d


def test_relion_written_projections_load(relion_projections: Path) -> None:
    d = relion_projections
    ps = load_particles(d / "proj.star")
    angles = read_star(d / "angles.star")["particles"]
    assert len(ps) == 60 and ps.box == 30 and ps.apix == 1.0
    np.testing.assert_allclose(ps.euler_deg, angles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], atol=1e-5)
    np.testing.assert_allclose(ps.shift_A, angles[["rlnOriginXAngst", "rlnOriginYAngst"]], atol=1e-5)
    np.testing.assert_allclose(ps.ctf.defocus_v_A, angles["rlnDefocusV"], rtol=1e-6)
    assert ps.images(slice(None)).std() > 0


def test_relion_reconstruct_reads_our_star(relion_projections: Path) -> None:
    d = relion_projections
    ps = load_particles(d / "proj.star")
    rows = np.arange(60) % 3 != 0  # 40 particles
    out_dir = d / "ours"
    write_particles_star(out_dir / "subset.star", ps, rows=rows,
                         extra_columns={"cryohetZ1": np.arange(60.0), "cryohetSubset": (np.arange(60) % 2) + 1})
    res = subprocess.run(["relion_reconstruct", "--i", "subset.star", "--o", "rec.mrc", "--ctf"], cwd=out_dir,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rec, apix = read_map(out_dir / "rec.mrc")
    model, _ = read_map(d / "model.mrc")
    assert rec.shape == (30, 30, 30) and apix == pytest.approx(1.0)
    cc = np.corrcoef(rec.ravel(), model.ravel())[0, 1]
    print(f"relion_reconstruct from our STAR: correlation with the model {cc:.3f}")
    assert cc > 0.8, cc
    back = load_particles(out_dir / "subset.star")  # absolute image paths: loads from anywhere
    assert len(back) == 40
    np.testing.assert_array_equal(back.images(slice(None)), ps.images(rows))
    np.testing.assert_allclose(back.table["cryohetZ1"], np.arange(60.0)[rows])


def test_particleset_is_the_documented_dataclass() -> None:
    ps = load_particles(DATA / "relion31.star")
    assert isinstance(ps, ParticleSet)
    for name, kind in [("euler_deg", (5, 3)), ("shift_A", (5, 2)), ("stack_id", (5,)), ("stack_index", (5,))]:
        assert getattr(ps, name).shape == kind
    assert ps.euler_deg.dtype == np.float64 and ps.shift_A.dtype == np.float64
    assert np.issubdtype(ps.stack_id.dtype, np.integer) and np.issubdtype(ps.stack_index.dtype, np.integer)
    assert len(ps.ctf) == 5 and isinstance(ps.source, Path) and ps.source == DATA / "relion31.star"
