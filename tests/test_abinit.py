"""Ab initio reconstruction (cryohet abinit) and its pose search, on simulated particles whose poses are hidden:
the SO(3) grid covers the rotations, shared-grid scoring equals per-image scoring, repeated poses are counted once,
the hierarchical search finds the true poses on the true map, the pose-error measure sees through frame and hand,
and the method recovers poses and a map that relion_reconstruct reproduces from its STAR; bad input is refused and
a stopped run resumes."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from relion_tools import relion
from scipy.spatial.transform import Rotation

from cryohet.data.loader import Batch
from cryohet.data.prepare import ImagePreparer
from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.fourier import fft3c, fourier_resize_3d, ifft3c, radius_grid
from cryohet.geometry.lattice import Lattice
from cryohet.inference.pose_grid import (
    Hypotheses,
    _distinct_top,
    grid_search,
    refine_hypotheses,
    shift_grid,
    so3_grid,
)
from cryohet.inference.pose_search import PoseScorer, angle_between_deg
from cryohet.io.mrc import read_map
from cryohet.io.particles import load_particles
from cryohet.io.star import read_star, write_star
from cryohet.methods.abinit import METHOD as ABINIT
from cryohet.reconstruct.fsc import fsc
from cryohet.runner import run_method
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import discrete_conformations
from cryohet.simulate.simulate import simulate_particles
from cryohet.validation.poses import MIRROR, map_in_true_frame, pose_errors

# long: make test runs this module in the current environment only (tests/conftest.py, one_stack)
pytestmark = pytest.mark.one_stack("current")

BOX, APIX = 32, 4.0
#: the settings the end-to-end runs use (the defaults but fewer global iterations on fewer particles and fewer
#: local ones, to save time)
FAST = {"global_iterations": 10, "global_subset": 200, "local_iterations": 2, "threads": 2}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """400 particles of the bundled molecule at box 32, 4 Å/px, SNR 1, with their true poses and map; image names
    relative to the current folder's parent of the STAR (``star``)."""
    d = tmp_path_factory.mktemp("abinit_data")
    conf = discrete_conformations([default_molecule()], apix=APIX, box=BOX, resolution_A=10.0)
    out = simulate_particles(conf, d, 400, 1.0, seed=3)
    return d, out, torch.as_tensor(conf.maps[0]) * out.image_scale


@pytest.fixture(scope="module")
def solved(sim, tmp_path_factory):
    d, _, _ = sim
    out = tmp_path_factory.mktemp("abinit_run")
    run_method(ABINIT, {"particles": str(d / "particles.star"), **FAST}, out)
    return out


def _truth_and_estimate(star_true, star_est):
    truth, est = load_particles(star_true), load_particles(star_est)
    return pose_errors(euler_to_matrix(est.euler_deg), est.shift_A, euler_to_matrix(truth.euler_deg), truth.shift_A)


def test_fourier_resize_pads_and_crops():
    """Padding a map's transform then cropping it back gives the map again (without its Nyquist planes); a padded
    map keeps the voxel values (the same mean voxel value)."""
    rng = np.random.default_rng(0)
    vol = fourier_resize_3d(torch.as_tensor(rng.normal(size=(18, 18, 18)), dtype=torch.float32), 16)
    vol = ifft3c(fft3c(vol) * (radius_grid(16, 3) < 8)).real  # no content at Nyquist
    up = fourier_resize_3d(vol, 24)
    assert up.shape == (24, 24, 24)
    torch.testing.assert_close(fourier_resize_3d(up, 16), vol, atol=1e-4, rtol=1e-4)
    assert float(up.mean()) == pytest.approx(float(vol.mean()), abs=1e-5)


def test_grid_covers_rotations():
    """Every rotation lies within about one step of the 15° grid (4,392 rotations, as cryoDRGN's 4,608), the
    nearest grid point of 500 random rotations at most 12.5° away (measured 11.4°)."""
    grid = so3_grid(15.0)
    assert 4000 < len(grid) < 5000
    R = torch.as_tensor(Rotation.random(500, random_state=1).as_matrix(), dtype=torch.float32)
    nearest = angle_between_deg(R[:, None], grid[None]).nan_to_num(180.0).min(1).values
    assert float(nearest.max()) < 12.5
    assert torch.allclose(grid @ grid.transpose(1, 2), torch.eye(3).expand(len(grid), 3, 3), atol=1e-5)


@pytest.mark.parametrize("fit_scale", [False, True])
def test_grid_scores_equal_per_image_scores(sim, fit_scale):
    """score_grid (one slice per rotation for all images) equals score_points with the rotations and shifts given
    to every image, with and without the per-hypothesis image scale."""
    d, _, volume = sim
    particles = load_particles(d / "particles.star")
    rows = np.arange(6)
    batch = ImagePreparer(particles, Lattice(BOX, APIX))(Batch(rows, torch.from_numpy(particles.reader().read(rows))))
    scorer = PoseScorer(volume, Lattice(BOX, APIX), 12.0, fit_scale=fit_scale, chunk=7)
    R = so3_grid(40.0)[:20]
    S = shift_grid(2.0, 3)
    x, c = scorer.take(batch.images_ft), scorer.take(batch.ctf)
    grid = scorer.score_grid(x, c, R, S)
    per_image = scorer.score_points(x, c, R.expand(6, -1, -1, -1), S.expand(6, -1, -1))
    torch.testing.assert_close(grid, per_image, rtol=1e-4, atol=1e-2)


def test_repeated_poses_count_once():
    """Two equal scores in a row are one pose: it is kept once and the next distinct pose takes the free place;
    with fewer distinct poses than asked, the extra places carry no weight (−inf)."""
    scores = torch.tensor([[5.0, 3.0, 5.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    top, idx = _distinct_top(scores, 3)
    assert top[0].tolist() == [5.0, 3.0, 1.0] and idx[0, 2] == 3
    assert top[1, 0] == 2.0 and torch.isinf(top[1, 1:]).all()
    weights = Hypotheses(torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 2), top).posterior()
    assert torch.allclose(weights.sum(1), torch.ones(2)) and weights[1, 0] == 1.0


def test_hierarchical_search_finds_true_poses(sim):
    """On the true map (10 Å, 4 Å/px), the base grid then three levels find the true rotations (median error under
    4.5°, measured 3.5°: the map's resolution limits it) and origins (under 0.3 px) of 60 particles searched over
    all of SO(3) and ±3 px."""
    d, _, volume = sim
    particles = load_particles(d / "particles.star")
    rows = np.arange(60)
    blind = ImagePreparer(replace(particles.subset(rows), shift_A=np.zeros((60, 2))), Lattice(BOX, APIX))
    batch = blind(Batch(rows, torch.from_numpy(particles.reader().read(rows))))
    scorer = PoseScorer(volume, Lattice(BOX, APIX), 0.0, fit_scale=True)
    coarse = scorer.limited(4 * 8.0)
    hyp = grid_search(coarse, coarse.take(batch.images_ft), coarse.take(batch.ctf), so3_grid(15.0),
                      shift_grid(3.0), 8)
    step, step_s = 15.0, 1.0
    for _ in range(3):
        step, step_s = step / 2, step_s / 2
        hyp = refine_hypotheses(scorer, scorer.take(batch.images_ft), scorer.take(batch.ctf), hyp, step, step_s, 8,
                                max_shift_px=3.0)
    A_true = torch.as_tensor(euler_to_matrix(particles.euler_deg[rows]), dtype=torch.float32)
    assert float(angle_between_deg(hyp.rotations[:, 0], A_true).median()) < 4.5
    origin = torch.as_tensor(particles.shift_A[rows] / APIX, dtype=torch.float32)
    assert float((hyp.shifts_px[:, 0] - origin).norm(dim=-1).median()) < 0.3


def test_pose_errors_see_through_frame_translation_and_hand():
    """Poses of the mirrored map, seen in a rotated frame, with origins of a moved map, have zero error after the
    alignment, which reports the hand; rotation-vector noise of 3° per axis gives a median error near 1.54 × 3°
    (the median of a Maxwell distribution)."""
    rng = np.random.default_rng(0)
    A_true = Rotation.random(300, random_state=rng).as_matrix()
    s_true = rng.normal(0, 3, (300, 2))
    Q = Rotation.random(random_state=rng).as_matrix()
    t = np.array([2.0, -1.0, 4.0])
    A_est = MIRROR @ (A_true @ Q.T) @ MIRROR
    s_est = s_true + A_true[:, :2, :] @ t
    e = pose_errors(A_est, s_est, A_true, s_true)
    assert e.mirrored and e.median_angle_deg < 1e-3 and e.median_shift_A < 1e-6
    noise = Rotation.from_rotvec(rng.normal(0, np.radians(3.0), (300, 3)))
    e2 = pose_errors(A_true @ noise.as_matrix(), s_true, A_true, s_true)
    assert not e2.mirrored and 3.8 < e2.median_angle_deg < 5.5


def test_abinit_recovers_poses_and_map(sim, solved):
    """From images without poses: median pose error under 6° and 90 % of the particles within 10°, origins within
    1.2 Å (measured 4.73°, 93 %, 0.67 Å with 10 global iterations of 200 particles; 4.2-4.3° over seeds 0-2 with 15
    of 300); the map, moved into the true frame by the fitted rotation, translation and hand, agrees with the true
    map (FSC above 0.75 to 16 Å, measured 0.865); outputs and the
    hand's note are in the record."""
    d, _, _ = sim
    e = _truth_and_estimate(d / "particles.star", solved / "particles.star")
    print(f"median pose error {e.median_angle_deg:.2f}°, {100 * (e.angle_deg < 10).mean():.0f} % within 10°, "
          f"origins {e.median_shift_A:.2f} Å")
    assert e.median_angle_deg < 6.0 and (e.angle_deg < 10).mean() > 0.9 and e.median_shift_A < 1.2
    ours = map_in_true_frame(read_map(solved / "map.mrc")[0], e, APIX)
    truth = read_map(d / "maps" / "state_000.mrc")[0]
    curve = fsc(torch.as_tensor(ours, dtype=torch.float32), torch.as_tensor(truth))
    print(f"FSC with the true map to 16 Å: min {float(curve[1:int(BOX * APIX / 16.0) + 1].min()):.3f}")
    assert curve[1:int(BOX * APIX / 16.0) + 1].min() > 0.75
    record = (solved / "cryohet_run.json").read_text()
    assert "hand undetermined" in record and "\"poses\": true" in record
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.star", "iterations.png", "orientations.png"):
        assert (solved / name).stat().st_size > 0
    star = read_star(solved / "particles.star")["particles"]
    assert {"rlnRandomSubset", "rlnMaxValueProbDistribution", "rlnLogLikeliContribution"} <= set(star.columns)
    assert not list(solved.glob(".*.part*"))


def test_relion_reconstruct_of_our_poses_gives_our_map(sim, solved, tmp_path):
    """relion_reconstruct of the output STAR (our poses in RELION's conventions) gives our map: FSC above 0.9 to
    the map's resolution."""
    d, _, _ = sim
    relion("relion_reconstruct", "--i", str(solved / "particles.star"), "--o", str(tmp_path / "r.mrc"), "--ctf",
           "--angpix", str(APIX), cwd=d)
    theirs, _ = read_map(tmp_path / "r.mrc")
    ours, _ = read_map(solved / "map.mrc")
    curve = fsc(torch.as_tensor(ours), torch.as_tensor(theirs))
    shell_16A = int(BOX * APIX / 16.0)
    assert curve[1:shell_16A + 1].min() > 0.9


def test_bad_input_is_refused(sim, tmp_path):
    """Particles without CTF, a box below 16 px, a resolution limit beyond Nyquist and a reference of another box:
    clear errors naming the file, and nothing written but the run's record and log."""
    d, _, _ = sim
    tables = read_star(d / "particles.star")
    parts = tables["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    write_star(tmp_path / "noctf.star", {"optics": tables["optics"], "particles": parts})
    with pytest.raises(InputError, match="noctf.star.*no CTF parameters"):
        run_method(ABINIT, {"particles": str(tmp_path / "noctf.star"), "datadir": str(d)}, tmp_path / "a")
    with pytest.raises(InputError, match="particles.star.*beyond the images' Nyquist"):
        run_method(ABINIT, {"particles": str(d / "particles.star"), "resolution_A": 5.0}, tmp_path / "b")
    small = discrete_conformations([default_molecule()], apix=16.0, box=8, resolution_A=32.0)
    sim_small = simulate_particles(small, tmp_path / "small", 20, 1.0, seed=1)
    with pytest.raises(InputError, match="particles.star.*8 px.*at least 16"):
        run_method(ABINIT, {"particles": str(sim_small.particles_star)}, tmp_path / "c")
    with pytest.raises(InputError, match="state_000.mrc.*particles are 32 px"):
        run_method(ABINIT, {"particles": str(d / "particles.star"),
                            "reference": str(tmp_path / "small" / "maps" / "state_000.mrc")}, tmp_path / "d")
    for out in ("a", "b", "c", "d"):
        assert {p.name for p in (tmp_path / out).iterdir()} <= {"cryohet_run.json", "run.log"}


def test_resume_continues_as_an_uninterrupted_run(sim, tmp_path):
    """A run stopped after its global iterations and resumed ends as one that ran through (same poses and maps);
    a resume with other settings is refused naming the checkpoint and the setting."""
    d, _, _ = sim
    tables = read_star(d / "particles.star")
    write_star(d / "particles_120.star", {"optics": tables["optics"], "particles": tables["particles"].iloc[:120]})
    values = {"particles": str(d / "particles_120.star"), "global_iterations": 3, "local_iterations": 1,
              "global_subset": 60, "threads": 2}
    run_method(ABINIT, values, tmp_path / "whole")
    run_method(ABINIT, {**values, "local_iterations": 0}, tmp_path / "resumed")
    run_method(ABINIT, {**values, "resume": True}, tmp_path / "resumed")
    a, b = load_particles(tmp_path / "whole" / "particles.star"), load_particles(tmp_path / "resumed" /
                                                                                 "particles.star")
    np.testing.assert_allclose(a.euler_deg, b.euler_deg, atol=1e-3)
    np.testing.assert_allclose(read_map(tmp_path / "whole" / "map.mrc")[0],
                               read_map(tmp_path / "resumed" / "map.mrc")[0], atol=1e-5)
    assert "resuming from" in (tmp_path / "resumed" / "run.log").read_text()
    with pytest.raises(InputError, match=r"checkpoint\.safetensors.*other settings.*keep"):
        run_method(ABINIT, {**values, "keep": 4, "resume": True}, tmp_path / "resumed")


def test_runs_at_a_realistic_box(tmp_path):
    """Box 128 at 1.5 Å/px on the CPU (40 particles, two global iterations and one local): map, half-maps and FSC at
    the full box, a finite pose for every particle, origins within the searched range."""
    conf = discrete_conformations([default_molecule()], apix=1.5, box=128, resolution_A=6.0)
    sim = simulate_particles(conf, tmp_path / "data", 40, 2.0, seed=2)
    run_method(ABINIT, {"particles": str(sim.particles_star), "global_iterations": 2, "local_iterations": 1,
                        "global_subset": 20, "threads": 2}, tmp_path / "run")
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        vol, apix = read_map(tmp_path / "run" / name)
        assert vol.shape == (128, 128, 128) and apix == pytest.approx(1.5) and np.isfinite(vol).all()
    est = load_particles(tmp_path / "run" / "particles.star")
    assert np.isfinite(est.euler_deg).all() and np.abs(est.shift_A).max() <= 0.1 * 128 * 1.5 + 1e-3
