"""Simulator: bundled molecule, atoms -> maps, motions, images with ground truth, RELION round trip."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryohet.cli import main as cli_main
from cryohet.errors import InputError
from cryohet.geometry.ctf import CTFParams, ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.project import Projector
from cryohet.io.mrc import open_stack, read_map, stack_apix, write_map
from cryohet.io.star import read_star
from cryohet.simulate.density import atoms_to_map, lowpass_map
from cryohet.simulate.molecules import (
    DEFAULT_DOMAINS,
    DEFAULT_MOLECULE_CLOSED,
    atom_coords,
    atom_keys,
    atom_weights,
    default_molecule,
    is_default_molecule,
    load_structure,
    rmsd,
    select_residues,
)
from cryohet.simulate.motions import (
    Conformations,
    auto_hinge,
    default_hinges,
    discrete_conformations,
    hinge_conformations,
    interpolation_conformations,
    maps_conformations,
    two_part_conformations,
)
from cryohet.simulate.simulate import draw_particles, simulate_particles
from cryohet.simulate.views import TOP_VIEW_SD_DEG

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _lowpass(v: np.ndarray, apix: float, res_A: float) -> np.ndarray:
    return lowpass_map(torch.tensor(np.ascontiguousarray(v), dtype=torch.float64), apix, res_A).numpy()


def _centre_px(m: np.ndarray) -> np.ndarray:
    idx = np.indices(m.shape).reshape(3, -1)
    return (idx * m.ravel()).sum(1) / m.sum()   # (z, y, x)


@pytest.fixture(scope="module")
def tiny_conf() -> Conformations:
    """Two states of the LID hinge, box 32 at 4 Å/pixel."""
    return hinge_conformations(default_molecule(), n_states=2, max_angle_deg=50.0, box=32, apix=4.0,
                               resolution_A=9.0)


# ------------------------------------------------------------------------------------------- molecule
def test_default_molecule_loads_in_two_matching_states():
    st, closed = default_molecule(), default_molecule(closed=True)
    assert is_default_molecule(st) and is_default_molecule(closed)
    assert [ch.name for ch in st[0]] == ["A"] and len(st[0]["A"]) == 214
    xyz = atom_coords(st)
    assert xyz.shape == (1656, 3)
    assert atom_keys(st) == atom_keys(closed)
    w = atom_weights(st)
    assert np.allclose((xyz * w[:, None]).sum(0) / w.sum(), 0.0, atol=0.01)  # stored centred
    core = select_residues(st, DEFAULT_DOMAINS["CORE"])
    lid = select_residues(st, DEFAULT_DOMAINS["LID"])
    assert rmsd(xyz[core], atom_coords(closed)[core]) < 3.0 < 10.0 < rmsd(xyz[lid], atom_coords(closed)[lid])
    with pytest.raises(ValueError):
        select_residues(st, "A:900-950")


def test_load_structure_reports_bad_files(tmp_path):
    with pytest.raises(InputError):
        load_structure(tmp_path / "missing.pdb")
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a model\n")
    with pytest.raises(InputError):
        load_structure(bad)


# ------------------------------------------------------------------------------------------------ maps
def test_atoms_to_map_is_centred_with_right_box_apix_axes_and_mass():
    st = default_molecule()
    xyz = atom_coords(st) + np.array([40.0, -25.0, 13.0])        # off-centre model: still centred in the box
    m = atoms_to_map(xyz, 48, 3.0, resolution_A=8.0, weights=atom_weights(st))
    assert m.shape == (48, 48, 48) and m.dtype == np.float32
    assert np.allclose(_centre_px(m), 24.0, atol=0.05)
    assert abs(m.sum() * 3.0**3 / atom_weights(st).sum() - 1) < 1e-3   # electrons per Å³: mass kept
    one = atoms_to_map(np.array([[6.0, -9.0, 3.0]]), 32, 3.0, resolution_A=7.0, centre_A=np.zeros(3))
    assert np.unravel_index(one.argmax(), one.shape) == (16 + 1, 16 - 3, 16 + 2)   # (z, y, x) <- (x, y, z) / apix
    assert np.allclose(_centre_px(one), [17, 13, 18], atol=0.1)


def test_hinge_moves_only_the_moving_domain_monotonically():
    st = default_molecule()
    xyz = atom_coords(st)
    hinge, closing_deg = default_hinges()["LID"]
    assert 45 < closing_deg < 60
    lid = select_residues(st, DEFAULT_DOMAINS["LID"])
    assert np.array_equal(hinge.moving, lid)
    closed = atom_coords(default_molecule(closed=True))
    assert rmsd(hinge.apply(xyz, closing_deg)[lid], closed[lid]) < 2.5   # the fitted hinge closes the LID
    moved = [rmsd(hinge.apply(xyz, a)[lid], xyz[lid]) for a in np.linspace(0, 50, 6)]
    fixed = [rmsd(hinge.apply(xyz, a)[~lid], xyz[~lid]) for a in np.linspace(0, 50, 6)]
    assert fixed == [0.0] * 6
    assert moved[0] < 1e-9 and np.all(np.diff(moved) > 0)
    # the maps: state 0 drifts away monotonically, and density changes only near the LID
    conf = hinge_conformations(st, n_states=4, max_angle_deg=50.0, box=40, apix=3.0, resolution_A=8.0)
    assert conf.maps.shape == (4, 40, 40, 40) and conf.kind == "continuous"
    assert np.allclose(conf.tau[:, 0], [0, 1 / 3, 2 / 3, 1])
    c = [_corr(conf.maps[0], conf.maps[k]) for k in range(4)]
    assert np.all(np.diff(c) < 0)
    diff = np.abs(conf.maps[-1] - conf.maps[0])
    centre = conf.meta["hinge_point_A"]
    assert len(centre) == 3
    core_map = atoms_to_map(xyz[~lid], 40, 3.0, 8.0, centre_A=np.zeros(3), weights=atom_weights(st)[~lid])
    lid_map = atoms_to_map(xyz[lid], 40, 3.0, 8.0, centre_A=np.zeros(3), weights=atom_weights(st)[lid])
    far_from_lid = (lid_map < 0.01 * lid_map.max()) & (core_map > 0.3 * core_map.max())
    assert far_from_lid.sum() > 100
    assert diff[far_from_lid].max() < 0.2 * diff.max()


def test_auto_hinge_on_any_model():
    st = default_molecule()
    st.name = "someone_else"                         # not recognised as the bundled molecule
    h = auto_hinge(atom_coords(st))
    assert 0.2 < h.moving.mean() < 0.4
    xyz = atom_coords(st)
    out = h.apply(xyz, 30.0)
    assert rmsd(out[~h.moving], xyz[~h.moving]) == 0.0 and rmsd(out[h.moving], xyz[h.moving]) > 2.0
    conf = hinge_conformations(st, n_states=2, max_angle_deg=30.0, box=32, apix=4.0, resolution_A=9.0,
                               hinge="A:1-40")
    assert conf.meta["moving_atoms"] == int(select_residues(st, "A:1-40").sum())


def test_two_part_interpolation_discrete_and_map_series(tmp_path):
    st, closed = default_molecule(), default_molecule(closed=True)
    two = two_part_conformations(st, n_per_axis=2, box=32, apix=4.0, resolution_A=9.0)
    assert two.tau.shape == (4, 2) and two.dim == 2
    assert {tuple(t) for t in two.tau} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # τ1 and τ2 change different parts of the map
    d1, d2 = two.maps[2] - two.maps[0], two.maps[1] - two.maps[0]        # (1,0) - (0,0), (0,1) - (0,0)
    assert abs(_corr(np.abs(d1), np.abs(d2))) < 0.5
    interp = interpolation_conformations(st, closed, n_states=3, box=32, apix=4.0, resolution_A=9.0)
    ref = discrete_conformations([st, closed], box=32, apix=4.0, resolution_A=9.0)
    assert ref.kind == "discrete" and np.array_equal(ref.tau[:, 0], [0, 1])
    assert _corr(interp.maps[0], ref.maps[0]) > 0.99 and _corr(interp.maps[2], ref.maps[1]) > 0.98
    assert _corr(interp.maps[0], interp.maps[2]) < 0.95
    for k in range(3):
        write_map(tmp_path / f"m{k}.mrc", interp.maps[k], 4.0)
    series = maps_conformations(str(tmp_path / "m*.mrc"))
    assert series.apix == pytest.approx(4.0) and np.allclose(series.tau[:, 0], [0, 0.5, 1])
    assert np.allclose(series.maps, interp.maps, atol=1e-6)
    assert maps_conformations(f"{tmp_path / 'm2.mrc'},{tmp_path / 'm0.mrc'}", discrete=True).kind == "discrete"
    with pytest.raises(InputError):
        maps_conformations(str(tmp_path / "nothing*.mrc"))
    with pytest.raises(InputError):
        maps_conformations(str(tmp_path / "absent.mrc"))


# ---------------------------------------------------------------------------------------------- images
def test_ground_truth_lines_up_with_star_rows_and_images(tmp_path, tiny_conf):
    out = simulate_particles(tiny_conf, tmp_path, 150, snr=None, populations=[0.7, 0.3], seed=3,
                             shift_sigma_A=6.0, chunk_size=32)
    gt = np.load(out.ground_truth)
    star = read_star(out.particles_star)
    optics, parts = star["optics"], star["particles"]
    assert len(parts) == 150 and optics["rlnImageSize"][0] == 32 and optics["rlnImagePixelSize"][0] == 4.0
    assert list(parts["rlnImageName"][:2]) == ["000001@particles.mrcs", "000002@particles.mrcs"]
    assert np.array_equal(parts["cryohetTrueState"], gt["state"])
    assert np.allclose(parts["cryohetTrueTau1"], gt["tau"][:, 0]) and np.allclose(gt["tau"], tiny_conf.tau[gt["state"]])
    assert np.allclose(parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), gt["euler_deg"], atol=1e-5)
    assert np.allclose(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), gt["shift_A"], atol=1e-5)
    assert np.allclose(parts["rlnDefocusU"], gt["defocus_u_A"], atol=1e-3)
    assert set(parts["rlnRandomSubset"]) == {1, 2} and abs((parts["rlnRandomSubset"] == 1).sum() - 75) <= 1
    assert 0.6 < (gt["state"] == 0).mean() < 0.8                      # populations honoured
    stack = open_stack(out.particles_mrcs)
    assert stack.shape == (150, 32, 32) and stack_apix(out.particles_mrcs) == pytest.approx(4.0)
    # every row's parameters re-make exactly that row's image (rows are not shuffled by the per-state pass)
    rows = np.array([0, 1, 77, 149])
    ctf = ctf_2d(CTFParams.broadcast(4, defocus_u_A=parts["rlnDefocusU"].to_numpy()[rows],
                                     defocus_v_A=parts["rlnDefocusV"].to_numpy()[rows],
                                     defocus_angle_deg=parts["rlnDefocusAngle"].to_numpy()[rows],
                                     voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1), 32, 4.0)
    A = torch.as_tensor(euler_to_matrix(gt["euler_deg"][rows]), dtype=torch.float32)
    shift_px = torch.as_tensor(gt["shift_A"][rows] / 4.0, dtype=torch.float32)
    for j, r in enumerate(rows):
        img = Projector(torch.as_tensor(tiny_conf.maps[gt["state"][r]])).project(A[j:j + 1], shift_px[j:j + 1],
                                                                                 ctf[j:j + 1])[0].numpy()
        assert np.allclose(stack[r], img, atol=1e-4 * np.abs(img).max())
    assert len(out.map_paths) == 2 and read_map(out.map_paths[1])[0].shape == (32, 32, 32)
    mean, _ = read_map(out.mean_map)
    frac = np.bincount(gt["state"], minlength=2) / 150
    assert np.allclose(mean, frac[0] * tiny_conf.maps[0] + frac[1] * tiny_conf.maps[1], atol=1e-5)


def test_snr_is_honoured(tmp_path, tiny_conf):
    kw = dict(n_particles=400, seed=11, chunk_size=128)
    clean = simulate_particles(tiny_conf, tmp_path / "clean", snr=None, **kw)
    noisy = simulate_particles(tiny_conf, tmp_path / "noisy", snr=0.05, **kw)
    c = np.array(open_stack(clean.particles_mrcs), dtype=np.float64)
    n = np.array(open_stack(noisy.particles_mrcs), dtype=np.float64)
    assert clean.noise_sigma == 0.0 and clean.image_scale == 1.0
    noise = n / noisy.image_scale - c                                      # same seed: same poses, CTF, states
    assert abs(noise.std() / noisy.noise_sigma - 1) < 0.01 and abs(noise.mean()) < 0.01 * noisy.noise_sigma
    assert abs((n - c * noisy.image_scale).var() - 1.0) < 0.02             # normalised: unit noise variance
    radius_px = np.load(noisy.ground_truth)["particle_radius_A"] / 4.0
    yy, xx = np.indices((32, 32)) - 16
    inside = np.hypot(xx, yy) <= radius_px
    signal_var = c[:, inside].var(axis=1).mean()
    assert abs(signal_var / noise[:, inside].var() / 0.05 - 1) < 0.05
    assert np.load(noisy.ground_truth)["snr"] == pytest.approx(0.05)


def test_preferred_views_tilt_a_fraction_near_the_top_view_and_change_nothing_else():
    """``top_view_fraction`` 0.8: about 80 % of the particles tilted |N(0, 15°)| from the top view, the rest
    uniform (tilt's cosine uniform); states, in-plane angles, shifts, CTF and half-sets as without it; a fraction
    outside [0, 1] is refused."""
    n = 4000
    plain = draw_particles(n, 3, np.random.default_rng(5))
    top = draw_particles(n, 3, np.random.default_rng(5), top_view_fraction=0.8)
    moved = top.euler_deg[:, 1] != plain.euler_deg[:, 1]
    assert moved.mean() == pytest.approx(0.8, abs=0.03)
    assert np.abs(np.median(top.euler_deg[moved, 1]) - TOP_VIEW_SD_DEG * 0.674) < 1.0   # |N(0, σ)|: median 0.674σ
    assert np.abs(np.cos(np.radians(top.euler_deg[~moved, 1])).mean()) < 0.05            # the rest uniform
    for name in ("state", "shift_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "random_subset"):
        np.testing.assert_array_equal(getattr(top, name), getattr(plain, name))
    np.testing.assert_array_equal(top.euler_deg[:, [0, 2]], plain.euler_deg[:, [0, 2]])
    with pytest.raises(ValueError, match="top_view_fraction"):
        draw_particles(10, 1, np.random.default_rng(0), top_view_fraction=1.5)


def test_cli_simulate_then_relion_reconstruct(tmp_path):
    out = tmp_path / "sim"
    rc = cli_main(["simulate", "--o", str(out), "--n_states", "1", "--n_particles", "800", "--box", "48",
                   "--apix", "2.5", "--resolution_A", "7", "--snr", "10", "--shift_sigma_A", "6",
                   "--seed", "5", "--threads", "2"])
    assert rc == 0
    for name in ("particles.star", "particles.mrcs", "ground_truth.npz", "maps/state_000.mrc", "maps/mean.mrc"):
        assert (out / name).is_file(), name
    record = json.loads((out / "cryohet_run.json").read_text())
    assert record["status"] == "finished"
    kinds = {o["kind"]: o["path"] for o in record["outputs"]}
    assert kinds["particles_star"] == "particles.star" and kinds["ground_truth"] == "ground_truth.npz"
    assert kinds["volume_series"] == "maps/state_000.mrc"
    relion = shutil.which("relion_reconstruct")
    assert relion is not None, "RELION's relion_reconstruct must be on PATH"
    with open(out / "relion.log", "w") as log:
        subprocess.run([relion, "--i", "particles.star", "--o", "rec.mrc", "--ctf", "--angpix", "2.5"], cwd=out,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    rec, _ = read_map(out / "rec.mrc")
    truth, _ = read_map(out / "maps/state_000.mrc")
    good = _corr(_lowpass(rec, 2.5, 10.0), _lowpass(truth, 2.5, 10.0))
    mirrored = _corr(_lowpass(rec[::-1], 2.5, 10.0), _lowpass(truth, 2.5, 10.0))
    assert good > 0.98, good            # poses, origins, CTF and STAR/MRCS conventions agree with RELION
    assert mirrored < 0.9, mirrored     # and the hand is right


def test_cli_bad_molecule_is_an_input_error(tmp_path, capsys):
    rc = cli_main(["simulate", "--o", str(tmp_path / "x"), "--molecule", str(tmp_path / "none.pdb"),
                   "--n_particles", "10", "--box", "32"])
    assert rc == 2 and "none.pdb" in capsys.readouterr().err


@pytest.mark.parametrize("motion,extra,tau_cols,n_maps", [
    ("two_part", ["--n_states", "4"], 2, 4),
    ("interpolate", ["--n_states", "3"], 1, 3),
    ("hinge", ["--n_states", "2", "--moving", "A:30-59", "--max_angle_deg", "40"], 1, 2),
])
def test_cli_motions_write_their_tau_columns(tmp_path, motion, extra, tau_cols, n_maps):
    out = tmp_path / motion
    rc = cli_main(["simulate", "--o", str(out), "--motion", motion, "--n_particles", "40", "--box", "32",
                   "--apix", "4", "--resolution_A", "9", "--snr", "0", *extra])
    assert rc == 0
    parts = read_star(out / "particles.star")["particles"]
    assert [c for c in parts.columns if c.startswith("cryohetTrueTau")] == [f"cryohetTrueTau{j + 1}"
                                                                           for j in range(tau_cols)]
    gt = np.load(out / "ground_truth.npz")
    assert gt["conf_tau"].shape == (n_maps, tau_cols) and len(sorted((out / "maps").glob("state_*.mrc"))) == n_maps
    assert float(gt["noise_sigma"]) == 0.0
    # the written maps make a discrete series for motion=maps
    rc = cli_main(["simulate", "--o", str(tmp_path / "from_maps"), "--motion", "maps", "--discrete", "yes",
                   "--maps", str(out / "maps" / "state_*.mrc"), "--n_particles", "30", "--snr", "1"])
    assert rc == 0
    gt2 = np.load(tmp_path / "from_maps" / "ground_truth.npz")
    assert str(gt2["conf_kind"]) == "discrete" and np.array_equal(gt2["conf_tau"][:, 0], np.arange(n_maps))
    assert int(gt2["box"]) == 32 and float(gt2["apix"]) == pytest.approx(4.0)


def test_cli_user_mmcif_model_and_interpolation_needs_a_second_model(tmp_path, capsys):
    cif = tmp_path / "model.cif"
    default_molecule().make_mmcif_document().write_file(str(cif))
    args = ["simulate", "--molecule", str(cif), "--motion", "interpolate", "--n_particles", "20", "--box", "32",
            "--apix", "4", "--resolution_A", "9", "--n_states", "2"]
    assert cli_main([*args, "--o", str(tmp_path / "a")]) == 2
    assert "--second_model" in capsys.readouterr().err
    assert cli_main([*args, "--o", str(tmp_path / "b"), "--second_model", str(DEFAULT_MOLECULE_CLOSED)]) == 0
    gt = np.load(tmp_path / "b" / "ground_truth.npz")
    assert np.array_equal(gt["conf_tau"][:, 0], [0.0, 1.0])
    a, _ = read_map(tmp_path / "b" / "maps" / "state_000.mrc")
    b, _ = read_map(tmp_path / "b" / "maps" / "state_001.mrc")
    assert _corr(a, b) < 0.95                          # the two ends differ: the closed model was used
