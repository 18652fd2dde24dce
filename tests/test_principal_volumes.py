"""principal-volumes: subspace and latent recovery on simulated hinge data, homogeneous control, outputs, bad input,
convergence reporting, resume after kills at several points and from damaged checkpoints."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from faults import kill_when, run_until_killed, self_kill, start, temporaries

from cryohet.errors import InputError
from cryohet.inference.em_state import read_state
from cryohet.inference.ppca import band_limit, fit_principal_volumes, subspace_sines
from cryohet.io.mrc import read_map, write_map
from cryohet.io.particles import load_particles
from cryohet.io.weights import previous_path
from cryohet.models.linear import LinearModel
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.simulate.simulate import simulate_particles

BOX, APIX, N, SNR, RES_A = 32, 3.0, 1000, 1.0, 12.0
#: EM iterations of the homogeneous control's fits (the hinge fixture's fit has 10)
CONTROL_ITER = 5


def _simulate(tmp_path_factory, name: str, max_angle_deg: float, n_states: int):
    conf = hinge_conformations(default_molecule(), n_states=n_states, max_angle_deg=max_angle_deg, box=BOX,
                               apix=APIX, resolution_A=8.0)
    out = simulate_particles(conf, tmp_path_factory.mktemp(name), N, SNR, seed=3)
    truth = np.load(out.ground_truth)
    return conf, out, truth


def _true_pca(conf, truth, resolution_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Population-weighted mean, principal directions (rows) and eigenvalues of the band-limited true maps."""
    w = np.bincount(truth["state"], minlength=conf.n_states).astype(np.float64)
    w /= w.sum()
    maps = band_limit(conf.maps, conf.apix, resolution_A).astype(np.float64)
    mean = np.tensordot(w, maps, 1)
    X = (maps - mean).reshape(len(maps), -1) * np.sqrt(w)[:, None]
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    return mean, vt, s**2


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    conf, out, truth = _simulate(tmp_path_factory, "hinge", 50.0, 20)
    pset = load_particles(out.particles_star)
    res = fit_principal_volumes(pset, 2, resolution_A=RES_A, max_iter=10, seed=0)
    return conf, out, truth, pset, res


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    conf, out, truth = _simulate(tmp_path_factory, "homogeneous", 0.0, 1)
    pset = load_particles(out.particles_star)
    return pset, fit_principal_volumes(pset, 2, resolution_A=RES_A, max_iter=CONTROL_ITER, seed=0, prior="moments")


def test_principal_subspace_recovered(hinge):
    conf, out, truth, _, res = hinge
    _, vt, _ = _true_pca(conf, truth, res.resolution_A)
    sines = subspace_sines(res.components[:1], vt[:1])
    assert sines[0] < 0.5, f"first principal volume {np.degrees(np.arcsin(sines[0])):.1f}° from the truth"
    # a random direction in this space is almost orthogonal to the truth
    rnd = np.random.default_rng(0).standard_normal((1, BOX**3))
    assert subspace_sines(rnd, vt[:1])[0] > 0.99
    # orthonormal components, eigenvalues sorted
    flat = res.components.reshape(2, -1).astype(np.float64)
    assert np.allclose(flat @ flat.T, np.eye(2), atol=1e-4)
    assert res.eigenvalues[0] >= res.eigenvalues[1] > 0


def test_mean_matches_truth(hinge):
    conf, out, truth, _, res = hinge
    mean, _, _ = _true_pca(conf, truth, 0.0)       # the mean is the homogeneous map at full resolution
    corr = np.corrcoef(res.mean.ravel(), mean.ravel())[0, 1]
    scale = float((res.mean * mean).sum() / (mean * mean).sum()) / out.image_scale
    assert corr > 0.97
    assert 0.75 < scale < 1.25, f"mean map scale {scale:.3f} of the images' scale"


def test_coordinates_follow_true_tau(hinge):
    from scipy.stats import spearmanr

    _, _, truth, _, res = hinge
    rho = abs(spearmanr(res.latents[:, 0], truth["tau"][:, 0]).correlation)
    assert rho > 0.85, f"|Spearman(b1, tau)| = {rho:.3f}"
    # posterior uncertainty: positive, and well below the spread of b1 along the motion
    assert np.all(res.latent_std > 0)
    assert res.latent_std[:, 0].mean() < 0.6 * res.latents[:, 0].std()


# long (three more fits): make test runs it with the newest versions only (tests/conftest.py, one_stack); the hinge
# tests of the same fit run in both
@pytest.mark.one_stack("current")
def test_homogeneous_first_eigenvalue_near_zero(hinge, homogeneous):
    """With the moments prior (variability not supported above the noise is set to zero)."""
    homog_pset, homog = homogeneous
    het = fit_principal_volumes(hinge[3], 2, resolution_A=RES_A, max_iter=CONTROL_ITER, seed=0, prior="moments")
    assert het.eigenvalues[0] > 0
    assert homog.eigenvalues[0] < 1e-3 * het.eigenvalues[0], (homog.eigenvalues, het.eigenvalues)
    # with the default prior the homogeneous data still give a much smaller first eigenvalue
    default = fit_principal_volumes(homog_pset, 2, resolution_A=RES_A, max_iter=CONTROL_ITER, seed=0)
    print(f"first eigenvalue, moments prior: homogeneous / hinge {homog.eigenvalues[0] / het.eigenvalues[0]:.2e}; "
          f"default prior: homogeneous / hinge {default.eigenvalues[0] / hinge[4].eigenvalues[0]:.3f}")
    assert default.eigenvalues[0] < 0.3 * hinge[4].eigenvalues[0], (default.eigenvalues, hinge[4].eigenvalues)


def test_bad_inputs(hinge, tmp_path):
    from cryohet.methods.principal_volumes import METHOD
    from cryohet.runner import run_method

    _, out, _, pset, _ = hinge
    with pytest.raises(ValueError, match="--n_components"):
        fit_principal_volumes(pset.subset(np.arange(100)), 5)
    with pytest.raises(InputError, match="needs at least 50"):
        fit_principal_volumes(pset.subset(np.arange(30)), 1)
    with pytest.raises(ValueError, match="--resolution_A"):
        fit_principal_volumes(pset, 1, resolution_A=4.0)
    with pytest.raises(ValueError, match="--n_components"):
        METHOD.resolve({"particles": str(out.particles_star), "n_components": 0})
    mask = tmp_path / "mask16.mrc"
    write_map(mask, np.ones((16, 16, 16), np.float32), APIX)
    with pytest.raises(InputError, match="--mask"):
        run_method(METHOD, {"particles": str(out.particles_star), "mask": str(mask)}, tmp_path / "run")


def test_run_record_and_model(hinge, tmp_path):
    from cryohet.io.star import read_star
    from cryohet.methods.principal_volumes import METHOD
    from cryohet.models.base import load_volume_model
    from cryohet.record import read_record
    from cryohet.runner import run_method

    _, out, _, pset, _ = hinge
    mask = tmp_path / "mask.mrc"
    write_map(mask, np.ones((BOX,) * 3, np.float32), APIX)
    run_dir = tmp_path / "pv"
    run_method(METHOD, {"particles": str(out.particles_star), "n_components": 2, "resolution_A": 15.0,
                        "max_iter": 2, "movie_frames": 3, "mask": str(mask)}, run_dir)
    rec = read_record(run_dir)
    assert rec.status == "finished"
    # 2 iterations cannot meet --tol (3 warm-up iterations): said in the record, the log and the report
    (conv,) = rec.convergence
    assert conv["converged"] is False and conv["iterations"] == 2 and conv["tol"] == 1e-3
    assert "did not converge" in (run_dir / "run.log").read_text()
    assert (f"**did not converge**: EM stopped at the iteration limit (--max_iter) after 2 iterations with a last "
            f"subspace change (sine) of {conv['last_change']:.2e} against --tol 1.00e-03") in (run_dir / "report.md"
                                                                                             ).read_text()
    kinds = {o.kind for o in rec.outputs}
    assert {"model", "volume", "latents", "particles_star", "volume_series", "plot"} <= kinds
    (model_out,) = rec.of_kind("model")
    assert model_out.meta["model_type"] == "linear"
    assert len(rec.of_kind("volume_series")) == 2 * 3
    z = np.load(run_dir / rec.of_kind("latents")[0].path)
    assert z.shape == (len(pset), 2)
    star = read_star(run_dir / rec.of_kind("particles_star")[0].path)["particles"]
    assert np.allclose(star["cryohetZ1"].to_numpy(), z[:, 0], atol=1e-4)
    assert np.allclose(star["cryohetZ2"].to_numpy(), z[:, 1], atol=1e-4)
    assert (run_dir / rec.of_kind("plot")[0].path).read_bytes()[:4] == b"\x89PNG"

    # the model reproduces X_0 + Σ z_k X_k from the written maps
    model = load_volume_model(run_dir)
    assert model.latent_dim == 2 and model.box == BOX
    mean = read_map(run_dir / "mean.mrc")[0]
    comps = np.stack([read_map(run_dir / f"component_{k:02d}.mrc")[0] for k in (1, 2)])
    pts = np.array([[0.0, 0.0], [1.5, -2.0]], np.float32)
    vols = model.volumes(pts)
    assert vols.shape == (2, BOX, BOX, BOX)
    assert np.allclose(vols[0], mean, atol=1e-5)
    assert np.allclose(vols[1], mean + 1.5 * comps[0] - 2.0 * comps[1], atol=1e-4)
    # movie frames are X_0 + τ X_k
    frames = [o for o in rec.of_kind("volume_series") if o.meta["series"] == "component_1"]
    tau = frames[-1].meta["tau"]
    assert np.allclose(read_map(run_dir / frames[-1].path)[0], mean + tau * comps[0], atol=1e-4)

    # --resume yes in the same folder continues from the checkpoint of iteration 2
    assert (run_dir / "checkpoint.safetensors").is_file()
    run_method(METHOD, {"particles": str(out.particles_star), "n_components": 2, "resolution_A": 15.0,
                        "max_iter": 3, "movie_frames": 3, "mask": str(mask), "resume": True}, run_dir)
    assert "resuming from" in (run_dir / "run.log").read_text()
    report = (run_dir / "report.md").read_text()
    assert "3 EM iterations" in report
    assert '--method_params "n_components=2 resolution_A=15"' in report  # how to check the components


def test_linear_model_file(tmp_path):
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((8, 8, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((512, 3)))
    comps = q.T.reshape(3, 8, 8, 8).astype(np.float32)
    m = LinearModel(mean, comps, np.array([3.0, 2.0, 1.0]), 1.5, info={"work_box": 8})
    path = m.save(tmp_path / "m.npz")
    m2 = LinearModel.load(path)
    assert m2.apix == 1.5 and m2.latent_dim == 3 and m2.box == 8 and m2.info["work_box"] == "8"
    z = rng.standard_normal((4, 3))
    expect = mean[None] + np.einsum("mk,kxyz->mxyz", z, comps)
    assert np.allclose(m2.volumes(z), expect, atol=1e-5)
    assert np.allclose(m2.movie(2, [0.0, 2.0])[1], mean + 2.0 * comps[1], atol=1e-6)
    with pytest.raises(ValueError, match="coordinates"):
        m2.volumes(np.zeros((1, 2)))
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(InputError):
        LinearModel.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("pad, min_corr, max_scale_error", [(2, 0.99, 0.05), (1, 0.97, 0.1)])
def test_insertion_inverts_projector_slices(pad, min_corr, max_scale_error):
    """The M-step's trilinear insertion (half plane + Friedel mates) and solve invert ``Projector.slice``, also
    unpadded up to Nyquist's last shell (the corners of the outermost pixels' cells lie beyond 1.5 voxels; trilinear
    interpolation without padding is the coarser: measured corr 0.975, scale 1.07)."""
    from cryohet.geometry.euler import euler_to_matrix, random_euler
    from cryohet.geometry.fourier import centered_coords
    from cryohet.geometry.project import Projector, slice_coords
    from cryohet.inference.ppca import MapEquations, to_real_space

    n, radius = 16, 7
    vol = torch.as_tensor(band_limit(read_map_default(n), 1.0, n / radius)).float()
    A = torch.as_tensor(euler_to_matrix(random_euler(600, np.random.default_rng(0))), dtype=torch.float32)
    r = centered_coords(n)
    ky, kx = torch.meshgrid(r, r, indexing="ij")
    sel = torch.nonzero((kx**2 + ky**2).flatten() <= radius**2).squeeze(1)
    kxs, kys = kx.flatten()[sel], ky.flatten()[sel]
    half = torch.nonzero((kxs > 0) | ((kxs == 0) & (kys >= 0))).squeeze(1)
    hw = torch.where((kxs[half] == 0) & (kys[half] == 0), 0.5, 1.0).float()
    y = Projector(vol, pad).slice(A).reshape(len(A), -1)[:, sel[half]]
    pos = slice_coords(A, n, pad).reshape(len(A), -1, 3)[:, sel[half]]
    acc = MapEquations(n, pad, radius, 1, torch.device("cpu"))
    acc.insert(pos, hw, y, torch.ones(y.shape), torch.ones(len(half)), torch.ones(len(A), 1, dtype=torch.float64),
               torch.ones(len(A), 1, 1, dtype=torch.float64))
    lam = 1e-3 * acc.weight_diag().mean() * torch.ones(len(acc.flat), 1, dtype=torch.float64)
    c3 = centered_coords(pad * n, None, torch.float64) / pad
    limit = ((c3[:, None, None] ** 2 + c3[None, :, None] ** 2 + c3[None, None, :] ** 2) <= radius**2).double()
    rec = to_real_space(acc.to_grid(acc.solve(lam)[0]), n, pad, limit)[0]
    corr = np.corrcoef(rec.numpy().ravel(), vol.numpy().ravel())[0, 1]
    scale = float((rec * vol).sum() / (vol * vol).sum())
    assert corr > min_corr and abs(scale - 1) < max_scale_error, (corr, scale)


def read_map_default(n: int) -> np.ndarray:
    """The bundled molecule as a small map (box n, 6 Å/px)."""
    from cryohet.simulate.density import atoms_to_map
    from cryohet.simulate.molecules import atom_coords, atom_weights

    mol = default_molecule()
    return atoms_to_map(atom_coords(mol), n, 6.0, 12.0, weights=atom_weights(mol))


def test_resume_ends_as_an_uninterrupted_fit(hinge, tmp_path, caplog):
    """A fit stopped after 2 EM iterations and resumed to 4 equals a 4-iteration fit; other settings are refused;
    a damaged newest checkpoint gives way to the previous one (300 particles at 16 Å: the equality is exact at
    any size)."""
    pset = hinge[3].subset(np.arange(300))
    kw = dict(resolution_A=16.0, tol=0.0, seed=0)
    full = fit_principal_volumes(pset, 2, max_iter=4, **kw)
    ckpt = tmp_path / "checkpoint.safetensors"
    fit_principal_volumes(pset, 2, max_iter=2, checkpoint=ckpt, **kw)
    resumed = fit_principal_volumes(pset, 2, max_iter=4, checkpoint=ckpt, resume=True, **kw)
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed.latents, full.latents)
    np.testing.assert_array_equal(resumed.components, full.components)
    # the checkpoint now holds iteration 4: resuming with the same total does no EM iteration and gives the same
    again = fit_principal_volumes(pset, 2, max_iter=4, checkpoint=ckpt, resume=True, **kw)
    np.testing.assert_array_equal(again.latents, full.latents)
    with pytest.raises(InputError, match="n_components: 2 .checkpoint. vs 3"):
        fit_principal_volumes(pset, 3, max_iter=4, checkpoint=ckpt, resume=True, **kw)
    # a damaged newest checkpoint is refused with a warning and the previous one (iteration 3) used
    ckpt.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        again = fit_principal_volumes(pset, 2, max_iter=4, checkpoint=ckpt, resume=True, **kw)
    assert f"checkpoint {ckpt} is unusable" in caplog.text
    assert f"continuing from the previous checkpoint {previous_path(ckpt)}" in caplog.text
    np.testing.assert_array_equal(again.latents, full.latents)
    # with both damaged: an error naming both
    ckpt.write_bytes(b"not a checkpoint")
    previous_path(ckpt).write_bytes(b"")
    with pytest.raises(InputError, match=r"no usable checkpoint .*checkpoint\.safetensors: .*"
                                         r"checkpoint\.prev\.safetensors: "):
        fit_principal_volumes(pset, 2, max_iter=4, checkpoint=ckpt, resume=True, **kw)


def test_convergence_is_reported(hinge):
    """EM that meets --tol after the warm-up says so; one that stops at --max_iter says it did not converge."""
    pset = hinge[3].subset(np.arange(300))
    loose = fit_principal_volumes(pset, 1, resolution_A=16.0, max_iter=10, tol=1.0, warmup_iter=2)
    assert loose.converged and loose.iterations == 3 == len(loose.history) and loose.tol == 1.0
    assert loose.last_change == loose.history[-1]["subspace_change_sine"] < 1.0
    tight = fit_principal_volumes(pset, 1, resolution_A=16.0, max_iter=3, tol=0.0, warmup_iter=2)
    assert not tight.converged and tight.iterations == 3 and tight.last_change > 0


#: quick principal-volumes runs for the fault tests (300 particles; tol 0: every run does max_iter iterations)
FAST = dict(n_components=1, resolution_A=16.0, max_iter=8, tol=0.0, movie_frames=2, threads=1)


def _em_iteration(path: Path) -> int:
    """EM iteration of the checkpoint ``path`` (0 while there is none)."""
    try:
        return read_state(path)[0].iteration
    except InputError:
        return 0


def test_runs_killed_at_several_points_resume_to_the_same_result(hinge, tmp_path):
    """Killed while writing the checkpoint of EM iteration 2, between the two renames of that of iteration 4 and
    at a random moment after that of iteration 4 or 5, each time continued with --resume yes: the maps and
    coordinates are bit for bit those of an uninterrupted run."""
    from cryohet.methods.principal_volumes import METHOD
    from cryohet.runner import run_method

    tables = starfile.read(hinge[1].particles_star, always_dict=True)
    tables["particles"] = tables["particles"].iloc[:300]
    star = Path(hinge[1].particles_star).with_name("particles_300.star")
    starfile.write(tables, star)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run_method(METHOD, dict(particles=str(star), **FAST), ref)
    values = dict(particles=str(star), resume=True, **FAST)  # no checkpoint yet: from scratch
    code = ("from cryohet.runner import run_method\nfrom cryohet.methods.principal_volumes import METHOD\n"
            f"run_method(METHOD, {values!r}, {str(out)!r})\n")
    run_until_killed(self_kill(mid_write=2) + code)
    ckpt = out / "checkpoint.safetensors"
    assert _em_iteration(ckpt) == 1 and temporaries(out)      # the half-written one under a temporary name
    run_until_killed(self_kill(between_renames=4) + code)
    assert not ckpt.exists() and _em_iteration(previous_path(ckpt)) == 3
    rng = random.Random(5)
    iteration, delay = rng.choice([4, 5]), rng.uniform(0.0, 0.2)
    kill_when(start(code), lambda: _em_iteration(ckpt) >= iteration, delay)
    run_method(METHOD, values, out)
    for name in ("latents.npy", "latents_std.npy"):
        np.testing.assert_array_equal(np.load(ref / name), np.load(out / name))
    for name in ("mean.mrc", "component_01.mrc"):
        np.testing.assert_array_equal(read_map(ref / name)[0], read_map(out / name)[0])
    assert "8 EM iterations" in (out / "report.md").read_text()
    assert "continuing from the previous checkpoint" in (out / "run.log").read_text()
    assert json.loads((out / "cryohet_run.json").read_text())["status"] == "finished"
    assert not temporaries(out)
