"""moments --poses uniform: the invariant moments streamed in batches equal those of all images at once and match the
true map's model moments; the three-moment fit recovers a map (FSC to the truth after the best rotation and hand);
the run's outputs; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.inference.invariant_moments import InvariantMoments, SteerableFeatures, accumulate, defocus_groups
from cryohet.inference.moments import BallBasis, corner_noise_variance, plan
from cryohet.inference.moments_unknown_poses import ProjectionModel, fit_volume, relative_residuals
from cryohet.inference.pose_grid import sphere_grid
from cryohet.inference.ppca import ImageSource, band_limit
from cryohet.io.mrc import read_map
from cryohet.io.particles import load_particles
from cryohet.reconstruct.fsc import fsc
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.simulate.simulate import simulate_particles
from cryohet.validation.map_align import align_map

BOX, APIX, N, RES_A = 32, 3.0, 400, 20.0


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    conf = hinge_conformations(default_molecule(), n_states=1, box=BOX, apix=APIX, resolution_A=8.0)
    out = simulate_particles(conf, tmp_path_factory.mktemp("hom"), N, 10.0, seed=3)
    pset = load_particles(str(out.particles_star))
    lattice, radius, ball, _ = plan(N, BOX, APIX, RES_A, 0.0, 1, 64, torch.device("cpu"), pset.source)
    n = lattice.box
    basis = BallBasis(n, ball, radius, torch.device("cpu"))
    src = ImageSource(pset, lattice, radius, 64, torch.device("cpu"), 0.0)
    feats = SteerableFeatures(src.points, n, ball)
    vol = torch.as_tensor(np.asarray(conf.maps[0]), dtype=torch.float64)
    coef = basis.phi.double().T @ fourier_crop_3d(vol, n).reshape(-1)[basis.flat].double()   # truth in the basis
    return conf, out, pset, basis, src, feats, coef


def test_streaming_moments_match_all_at_once_and_the_true_map(homogeneous):
    conf, out, pset, basis, src, feats, coef = homogeneous
    sigma2 = corner_noise_variance(pset, basis.n, 0)
    group = torch.as_tensor(defocus_groups(0.5 * (pset.ctf.defocus_u_A + pset.ctf.defocus_v_A), 4))
    batches = [(b.images_ft, b.ctf, group[b.rows]) for b in src.batches()]
    assert len(batches) > 1
    streamed = accumulate(iter(batches), feats, sigma2, 4)
    whole = accumulate([tuple(torch.cat(x) for x in zip(*batches, strict=True))], feats, sigma2, 4)
    for a, b in zip(streamed.parts() + (streamed.ctf, streamed.counts), whole.parts() + (whole.ctf, whole.counts),
                    strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()))
    # the debiased moments of the images against the model's moments of the true map (images = scale × map)
    model = ProjectionModel(basis, feats, src.points.kxy, sphere_grid(20.0), streamed.ctf)
    with torch.no_grad():
        res = [float(r) for r in relative_residuals(model.moments(coef * out.image_scale), streamed)]
    # measured (N 400, SNR 10, 4 defocus groups) 8e-4, 2e-3, 3e-3; a map 10 % too strong gives 9e-3, 4e-2, 1e-1
    assert res[0] < 5e-3 and res[1] < 1e-2 and res[2] < 3e-2, res
    with torch.no_grad():
        off = [float(r) for r in relative_residuals(model.moments(1.1 * coef * out.image_scale), streamed)]
    assert all(o > 2 * r for o, r in zip(off, res, strict=True)), (off, res)


def test_three_moment_fit_recovers_the_map(homogeneous):
    _, _, _, basis, src, feats, coef = homogeneous
    one = torch.ones((1, len(src.points)), dtype=torch.float64)
    rot = torch.as_tensor(euler_to_matrix(random_euler(3000, np.random.default_rng(1))), dtype=torch.float32)
    with torch.no_grad():   # noise-free moments under 3000 random rotations (not the fit's quadrature)
        m = ProjectionModel(basis, feats, src.points.kxy, rot, one).moments(coef)
    data = InvariantMoments(*m, one, torch.ones(1, dtype=torch.float64))
    model = ProjectionModel(basis, feats, src.points.kxy, sphere_grid(20.0), one)
    fit = fit_volume(model, data, n_starts=1, iters=30)
    assert max(fit.residuals) < 1e-3, fit.residuals
    apix_n = BOX * APIX / basis.n
    truth = basis.to_maps(coef[None], BOX, apix_n, RES_A)[0]
    got = basis.to_maps(fit.mean[None], BOX, apix_n, RES_A)[0]
    curve = fsc(align_map(got, truth).aligned, truth)
    # measured: FSC 0.99, 0.94, 0.84, 0.60 in shells 1-4 (96, 48, 32, 24 Å; the basis' limit is 20 Å)
    assert curve[1:4].min() > 0.75 and curve[4] > 0.45, np.round(curve, 3)


@pytest.mark.one_stack("pinned")
def test_run(homogeneous, tmp_path):
    from cryohet.methods.moments import METHOD
    from cryohet.runner import run_method

    conf, out, *_ = homogeneous
    run_dir = tmp_path / "run"
    run_method(METHOD, {"particles": str(out.particles_star), "poses": "uniform", "resolution_A": RES_A,
                        "n_starts": 1, "fit_iter": 15, "defocus_groups": 1, "quadrature_deg": 30.0},
               run_dir)
    vol = read_map(run_dir / "map.mrc")[0]
    truth = band_limit(conf.maps[:1], APIX, RES_A)[0]
    curve = fsc(align_map(vol, truth).aligned, truth)
    # measured: 0.98, 0.90, 0.77 in shells 1-3 (one start, 15 L-BFGS steps per stage, one defocus group)
    assert curve[1:4].min() > 0.7, np.round(curve, 3)
    assert "hand are arbitrary" in (run_dir / "report.md").read_text()


class _Stop(Exception):
    pass


def _stop_at(what: str, index: int):
    """A ``progress`` that stops the run when the loop whose description contains ``what`` reaches ``index``."""
    def progress(items, desc, total):
        for i, item in enumerate(items):
            if what in desc and i == index:
                raise _Stop(desc)
            yield item
    return progress


@pytest.mark.one_stack("current")
def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(homogeneous, tmp_path):
    """Stopped after 3 of 7 batches of the moments' pass, resumed and stopped at the map's second random start,
    resumed and stopped at the low-rank model's second start, then resumed to the end: the map, the low-rank
    model, the residuals and the history equal the uninterrupted run's exactly. The method's --resume goes on
    from that checkpoint (with 2 threads where the fits had 1: its ball basis, computed again, would differ, so
    the checkpoint's is used); other settings are refused naming it."""
    from cryohet.methods.moments import METHOD
    from cryohet.runner import run_method

    _, out, pset, *_ = homogeneous
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, ckpt = _interrupted_three_times(pset, tmp_path)
    finally:
        torch.set_num_threads(threads)
    params = {"particles": str(out.particles_star), "poses": "uniform", "resolution_A": RES_A, "uniform_components": 1,
              "quadrature_deg": 30.0, "n_starts": 2, "fit_iter": 4, "defocus_groups": 2, "batch_size": 64,
              "resume": True, "threads": 2}
    run_method(METHOD, params, ckpt.parent)
    np.testing.assert_allclose(read_map(ckpt.parent / "map.mrc")[0], whole.volume, rtol=1e-5,
                               atol=1e-5 * float(np.abs(whole.volume).max()))
    assert "resuming from" in (ckpt.parent / "run.log").read_text()
    with pytest.raises(InputError, match=r"checkpoint.safetensors.*n_starts: 2 \(checkpoint\) vs 3"):
        run_method(METHOD, {**params, "n_starts": 3}, ckpt.parent)


def _interrupted_three_times(pset, tmp_path):
    """(the uninterrupted result, the checkpoint of the run interrupted three times and resumed to the end)."""
    from cryohet.inference.moments_uniform_state import read_uniform_state
    from cryohet.inference.moments_unknown_poses import fit_uniform_poses

    opts = dict(resolution_A=RES_A, n_components=1, quadrature_deg=30.0, n_starts=2, iters=4, defocus_groups=2,
                batch_size=64)
    whole = fit_uniform_poses(pset, **opts)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    stops = [("invariant moments", 3), ("map's random starts", 1), ("low-rank random starts", 1)]
    for k, (what, index) in enumerate(stops):
        with pytest.raises(_Stop, match=what):
            fit_uniform_poses(pset, checkpoint=ckpt, resume=k > 0, checkpoint_s=0.0, progress=_stop_at(what, index),
                              **opts)
        state = read_uniform_state(ckpt)[0]
        assert (state.batches, state.fits["map"].starts, state.fits["low_rank"].starts) == [(3, 0, 0), (7, 1, 0),
                                                                                            (7, 2, 1)][k]
    resumed = fit_uniform_poses(pset, checkpoint=ckpt, resume=True, **opts)
    for name in ("volume", "low_rank_mean", "components", "variances"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name), err_msg=name)
    assert resumed.residuals == whole.residuals and resumed.low_rank_residuals == whole.low_rank_residuals
    assert resumed.history == whole.history
    assert torch.equal(resumed.data.m3, whole.data.m3) and torch.equal(resumed.data.counts, whole.data.counts)
    return whole, ckpt


def test_bad_input(homogeneous, tmp_path):
    from cryohet.methods.moments import METHOD
    from cryohet.runner import run_method

    _, out, *_ = homogeneous
    # too few particles: refused naming the file, nothing written
    lines = out.particles_star.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("data_particles"))
    body = next(i for i in range(head, len(lines)) if lines[i].strip() and not lines[i].startswith(("_", "loop_",
                                                                                                 "data_")))
    few = tmp_path / "few.star"
    few.write_text("\n".join(lines[:body + 20]) + "\n")
    with pytest.raises(InputError, match="few.star.*only 20 particles"):
        run_method(METHOD, {"particles": str(few), "poses": "uniform", "datadir": str(out.particles_star.parent)},
                   tmp_path / "few")
    assert not (tmp_path / "few" / "map.mrc").exists()


def test_map_alignment_finds_rotation_hand_and_shift(homogeneous):
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.validation.map_align import apply_alignment, rotate_maps

    conf = homogeneous[0]
    ref = np.asarray(conf.maps[0], dtype=np.float32)
    R = torch.as_tensor(euler_to_matrix(np.array([[37.0, 71.0, -122.0]])), dtype=torch.float32)
    moved = np.roll(rotate_maps(torch.as_tensor(ref), R)[0].numpy()[:, :, ::-1], (1, -2, 0), axis=(0, 1, 2))
    al = align_map(moved, ref)
    assert al.mirrored
    curve = fsc(al.aligned, ref)
    # measured 0.99 to shell 5 and 0.94 at shell 11 (trilinear interpolation twice)
    assert curve[1:12].min() > 0.9, np.round(curve, 3)
    assert np.allclose(apply_alignment(moved, al), al.aligned, atol=1e-5 * float(np.abs(ref).max()))
