"""cryohet.io.cryosparc: the cryoSPARC -> RELION conversion on real .cs files, refusals, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix as relion_matrix
from cryohet.geometry.euler import matrix_to_euler as relion_euler
from cryohet.io.cryosparc import cs_pose_to_relion, read_cs, relion_to_cs_pose
from cryohet.io.particles import load_particles, write_particles_cs, write_particles_star
from cryohet.io.star import read_particles_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "thirdparty" / "cryodrgn-tests"


def relion_A(rot_deg: float, tilt_deg: float, psi_deg: float) -> np.ndarray:
    """RELION's Euler_angles2matrix written out independently (euler.cpp)."""
    a, b, g = np.deg2rad([rot_deg, tilt_deg, psi_deg])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def test_relion_matrix_and_euler_match_relion() -> None:
    rng = np.random.default_rng(0)
    eu = np.column_stack([rng.uniform(-180, 180, 200), rng.uniform(0, 180, 200), rng.uniform(-180, 180, 200)])
    eu[:3, 1] = [0.0, 180.0, 1e-9]  # degenerate tilts
    A = relion_matrix(eu)
    for k in range(len(eu)):
        np.testing.assert_allclose(A[k], relion_A(*eu[k]), atol=1e-12)
    back = relion_euler(A)
    np.testing.assert_allclose(relion_matrix(back), A, atol=1e-9)  # same rotation
    regular = eu[:, 1] > 1e-3
    np.testing.assert_allclose(back[regular, 1], eu[regular, 1], atol=1e-9)  # tilt in [0, 180] comes back as is


def test_p12_poses_shifts_ctf() -> None:
    cs = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")
    got = read_cs(DATA / "cryosparc_P12_J24_001_particles.cs")
    assert len(got["euler_deg"]) == 2019 and int(got["box"]) == 180
    assert float(got["apix"]) == pytest.approx(2.95)
    # pose: RELION's A (built independently above) equals the transpose of the Rodrigues rotation of the pose
    R = Rotation.from_rotvec(cs["alignments3D/pose"].astype(np.float64)).as_matrix()
    for k in range(0, 2019, 7):
        np.testing.assert_allclose(relion_A(*got["euler_deg"][k]), R[k].T, atol=1e-9)
    # shift: pixels of alignments3D/psize_A, same sign as RELION's origin
    np.testing.assert_allclose(got["shift_A"], cs["alignments3D/shift"] * cs["alignments3D/psize_A"][:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(got["defocus_u_A"], cs["ctf/df1_A"])
    np.testing.assert_allclose(got["defocus_v_A"], cs["ctf/df2_A"])
    np.testing.assert_allclose(got["defocus_angle_deg"], np.rad2deg(cs["ctf/df_angle_rad"].astype(np.float64)))
    assert set(got["voltage_kV"]) == {200.0} and set(np.round(got["cs_mm"], 6)) == {2.0}
    assert got["blob_path"][0].startswith("J19/extract/") and got["blob_idx"][1] == 1
    assert set(got["split"]) == {0, 1}


def test_zero_rotation_is_identity() -> None:
    eu = cs_pose_to_relion(np.zeros((1, 3)))
    np.testing.assert_allclose(relion_matrix(eu)[0], np.eye(3), atol=1e-12)
    # a rotation by +30 deg about z: R = Rz(30), A = R^T, which is RELION's rot + psi = 30 deg
    eu = cs_pose_to_relion(np.array([[0.0, 0.0, np.deg2rad(30.0)]]))
    assert eu[0, 1] == pytest.approx(0.0) and (eu[0, 0] + eu[0, 2]) % 360 == pytest.approx(30.0)


def test_empiar_cs_and_star_agree_on_ctf_and_images() -> None:
    """The same 7 particles: neither file carries poses, so CTF, pixel size and image mapping are compared."""
    cs = read_cs(DATA / "empiar_10076_7.cs", require_poses=False)
    star, _, _ = read_particles_table(DATA / "empiar_10076_7.star")
    np.testing.assert_allclose(cs["defocus_u_A"], star["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(cs["defocus_v_A"], star["rlnDefocusV"], rtol=1e-6)
    np.testing.assert_allclose(cs["defocus_angle_deg"], star["rlnDefocusAngle"], atol=1e-4)  # rad -> deg
    np.testing.assert_allclose(cs["voltage_kV"], star["rlnVoltage"])
    np.testing.assert_allclose(cs["cs_mm"], star["rlnSphericalAberration"], rtol=1e-6)
    np.testing.assert_allclose(cs["amp_contrast"], star["rlnAmplitudeContrast"], rtol=1e-6)
    assert float(cs["apix"]) == pytest.approx(star["rlnImagePixelSize"].iloc[0], rel=1e-6)  # 5 um / 38168
    assert [f"{i + 1}@{p}" for i, p in zip(cs["blob_idx"], cs["blob_path"])] == star["rlnImageName"].tolist()
    assert not bool(cs["has_poses"]) and np.isnan(cs["euler_deg"]).all()
    assert "rlnAngleRot" not in star.columns


def test_no_poses_refused() -> None:
    with pytest.raises(InputError) as e:
        read_cs(DATA / "cryosparc_J2_particles_exported.cs")
    msg = str(e.value)
    assert "cryosparc_J2_particles_exported.cs" in msg and "no 3-D poses" in msg and "alignments2D" in msg
    with pytest.raises(InputError) as e:
        read_cs(DATA / "empiar_10076_7.cs")
    assert "empiar_10076_7.cs" in str(e.value) and "no 3-D poses" in str(e.value)
    j2 = read_cs(DATA / "cryosparc_J2_particles_exported.cs", require_poses=False)
    assert len(j2["blob_path"]) == 22 and not j2["blob_path"][0].startswith(">")  # cryoSPARC's '>' dropped


def test_corrupt_and_incomplete_cs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.cs"
    junk.write_bytes(b"not numpy at all" * 10)
    with pytest.raises(InputError) as e:
        read_cs(junk)
    assert "junk.cs" in str(e.value) and "not a cryoSPARC .cs file" in str(e.value)
    cs = np.load(DATA / "cryosparc_P12_J24_001_particles.cs")
    keep = [n for n in cs.dtype.names if not n.startswith("ctf/df")]
    with open(tmp_path / "noctf.cs", "wb") as f:
        np.save(f, cs[keep])
    with pytest.raises(InputError) as e:
        read_cs(tmp_path / "noctf.cs")
    assert "noctf.cs" in str(e.value) and "ctf/df1_A" in str(e.value)
    with pytest.raises(InputError, match="file not found"):
        read_cs(tmp_path / "missing.cs")


# ------------------------------------------------------------------------------------------ writing .cs

def _same_rotations(pose_a: np.ndarray, pose_b: np.ndarray) -> float:
    """Largest angle (degrees) between the rotations of two sets of rotation vectors (a rotation vector and
    one of norm 2π - θ about the opposite axis are the same rotation)."""
    d = Rotation.from_rotvec(pose_a) * Rotation.from_rotvec(pose_b).inv()
    return float(np.degrees(d.magnitude()).max())


def test_cryosparc_particles_written_back_keep_uids_fields_and_poses(tmp_path: Path) -> None:
    """A subset of cryoSPARC's particles written as .cs and read by cryosparc-tools: the original uids, image
    references and every other field of the same rows, the same rotations (to 1e-4°) and shifts; latents as 3D
    Variability's components_mode_k/value and as cryohet/ fields; cryohet reads it back to the same poses and CTF."""
    from cryosparc.dataset import Dataset

    src = DATA / "cryosparc_P12_J24_001_particles.cs"
    ps = load_particles(src, check_images=False)
    rows = np.arange(0, len(ps), 7)
    z = np.arange(2 * len(ps), dtype=np.float64).reshape(-1, 2) / 10
    out = tmp_path / "subset.cs"
    write_particles_cs(out, ps, {"cryohetZ1": z[:, 0], "cryohetZ2": z[:, 1], "cryohetState": np.ones(len(ps))},
                       rows=rows)
    ours, orig = Dataset.load(out), Dataset.load(src)
    assert len(ours) == len(rows)
    np.testing.assert_array_equal(ours["uid"], orig["uid"][rows])
    assert set(orig.fields()) <= set(ours.fields())
    for field in ("blob/path", "blob/idx", "blob/shape", "blob/sign", "ctf/type", "ctf/exp_group_id",
                  "alignments3D/split", "alignments3D/class", "alignments3D/error"):
        np.testing.assert_array_equal(ours[field], orig[field][rows], err_msg=field)
    assert _same_rotations(ours["alignments3D/pose"], orig["alignments3D/pose"][rows]) < 1e-4
    np.testing.assert_allclose(ours["alignments3D/shift"], orig["alignments3D/shift"][rows], atol=1e-5)
    np.testing.assert_allclose(ours["ctf/df_angle_rad"], orig["ctf/df_angle_rad"][rows], rtol=1e-6)
    np.testing.assert_allclose(ours["components_mode_1/value"], z[rows, 1], rtol=1e-6)
    np.testing.assert_allclose(ours["cryohet/Z1"], z[rows, 0])
    assert (ours["cryohet/State"] == 1).all()
    back = load_particles(out, check_images=False)
    np.testing.assert_allclose(back.euler_deg, ps.euler_deg[rows], atol=1e-3)
    np.testing.assert_allclose(back.shift_A, ps.shift_A[rows], atol=1e-4)
    np.testing.assert_allclose(back.ctf.defocus_u_A, ps.ctf.defocus_u_A[rows], rtol=1e-6)


def test_relion_particles_written_as_cs_point_at_the_same_images(tmp_path: Path) -> None:
    """A RELION STAR written with its .cs twin: cryohet reads the twin to the same images, poses, origins and CTF
    as the STAR; every particle keeps one uid in every output (written twice, as two overlapping subsets); the
    pose conversion is the inverse of the one checked against RELION above; blob/sign -1 as cryoSPARC's own
    import of a RELION stack (empiar_10076_7.cs)."""
    from cryosparc.dataset import Dataset

    star = DATA / "relion31.star"
    ps = load_particles(star)
    write_particles_star(tmp_path / "a.star", ps, rows=[0, 1, 2])
    write_particles_star(tmp_path / "b.star", ps, rows=[1, 2, 3, 4], extra_columns={"rlnRandomSubset": [1, 2, 1, 2]})
    a, b = Dataset.load(tmp_path / "a.cs"), Dataset.load(tmp_path / "b.cs")
    np.testing.assert_array_equal(a["uid"][1:], b["uid"][:2])
    assert len(set(b["uid"].tolist())) == 4 and (b["blob/sign"] == -1).all()
    assert (Dataset.load(DATA / "empiar_10076_7.cs")["blob/sign"] == -1).all()
    np.testing.assert_array_equal(b["alignments3D/split"], [0, 1, 0, 1])
    twin = load_particles(tmp_path / "b.cs")
    np.testing.assert_array_equal(twin.images(slice(None)), ps.images([1, 2, 3, 4]))
    np.testing.assert_allclose(twin.euler_deg, ps.euler_deg[1:5], atol=1e-3)
    np.testing.assert_allclose(relion_euler(relion_matrix(twin.euler_deg)), relion_euler(relion_matrix(
        ps.euler_deg[1:5])), atol=1e-3)
    np.testing.assert_allclose(twin.shift_A, ps.shift_A[1:5], atol=1e-4)
    for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amp_contrast"):
        np.testing.assert_allclose(getattr(twin.ctf, k), getattr(ps.ctf, k)[1:5], rtol=1e-6, atol=1e-6, err_msg=k)
    pose = relion_to_cs_pose(ps.euler_deg)
    np.testing.assert_allclose(cs_pose_to_relion(pose), relion_euler(relion_matrix(ps.euler_deg)), atol=1e-6)
