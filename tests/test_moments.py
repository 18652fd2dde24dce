"""moments: the principal subspace, eigenvalue, coordinates and mean of simulated hinge data against the truth
(the population covariance of the simulator's true maps), the run's outputs, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cryohet.errors import InputError
from cryohet.inference.ppca import band_limit, subspace_sines
from cryohet.io.mrc import read_map
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.simulate.simulate import simulate_particles
from cryohet.validation.true_covariance import true_covariance

BOX, APIX, N, SNR, RES_A = 32, 3.0, 500, 1.0, 24.0


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    from cryohet.methods.moments import METHOD
    from cryohet.runner import run_method

    conf = hinge_conformations(default_molecule(), n_states=20, max_angle_deg=50.0, box=BOX, apix=APIX,
                               resolution_A=8.0)
    out = simulate_particles(conf, tmp_path_factory.mktemp("hinge"), N, SNR, seed=3)
    run_dir = tmp_path_factory.mktemp("moments")
    run_method(METHOD, {"particles": str(out.particles_star), "n_components": 2, "resolution_A": RES_A,
                        "diameter_A": 80.0, "movie_frames": 3, "batch_size": 128}, run_dir)
    return conf, out, np.load(out.ground_truth), run_dir


def test_principal_subspace_eigenvalue_and_coordinates(hinge):
    from cryohet.models.base import load_volume_model
    from cryohet.record import read_record

    conf, out, truth, run_dir = hinge
    rec = read_record(run_dir)
    assert rec.status == "finished"
    (conv,) = rec.convergence
    assert conv["converged"], conv
    lim = read_record(run_dir).of_kind("model")[0]
    model = load_volume_model(run_dir)
    assert model.latent_dim == 2 and lim.meta["model_type"] == "linear"
    comps = np.stack([read_map(run_dir / f"component_{k:02d}.mrc")[0] for k in (1, 2)])
    mean_true, vt, lam = true_covariance(conf.maps, truth["state"], APIX, float(model.info["resolution_A"]))
    sine = subspace_sines(comps[:1], vt[:1])[0]
    assert sine < 0.5, f"first principal volume {np.degrees(np.arcsin(sine)):.1f}° from the truth"
    rnd = np.random.default_rng(0).standard_normal((1, BOX ** 3))
    assert subspace_sines(rnd, vt[:1])[0] > 0.99                     # chance: almost orthogonal
    flat = comps.reshape(2, -1).astype(np.float64)
    assert np.allclose(flat @ flat.T, np.eye(2), atol=1e-3)
    # the first eigenvalue in the images' units (image_scale² × the maps' variance), within 30 %
    true_top = lam[0] * out.image_scale ** 2
    assert 0.7 * true_top < model.eigenvalues[0] < 1.4 * true_top, (model.eigenvalues, true_top)
    # Wiener coordinates along X_1 follow the true hinge angle
    z = np.load(run_dir / "latents.npy")
    assert z.shape == (N, 2)
    assert abs(spearmanr(z[:, 0], truth["tau"][:, 0]).correlation) > 0.8
    # the mean map (half-set backprojection) against the true mean at the analysis' limit
    mean = read_map(run_dir / "mean.mrc")[0]
    mean_bl = band_limit(mean[None], APIX, float(model.info["resolution_A"]))[0].ravel()
    assert np.corrcoef(mean_bl, mean_true.ravel())[0, 1] > 0.99


def test_bad_input(hinge, tmp_path):
    from cryohet.methods.moments import METHOD
    from cryohet.runner import run_method

    _, out, _, _ = hinge
    # a basis too large for the covariance (Nyquist at box 32): refused naming the particles, nothing written
    with pytest.raises(InputError, match="particles.star.*basis would be made from .* voxels") as err:
        run_method(METHOD, {"particles": str(out.particles_star), "resolution_A": 6.0}, tmp_path / "big")
    assert "--resolution_A" in str(err.value)
    assert not (tmp_path / "big" / "mean.mrc").exists()
    # too few particles
    few = tmp_path / "few.star"
    lines = (out.particles_star).read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("data_particles"))
    body = next(i for i in range(head, len(lines)) if lines[i].strip() and not lines[i].startswith(("_", "loop_",
                                                                                                 "data_")))
    few.write_text("\n".join(lines[:body + 20]) + "\n")
    with pytest.raises(InputError, match="few.star.*needs at least 50"):
        run_method(METHOD, {"particles": str(few), "datadir": str(out.particles_star.parent)}, tmp_path / "few")


class _Stop(Exception):
    pass


def test_an_interrupted_cg_resumed_ends_as_an_uninterrupted_one(hinge, tmp_path):
    """Stopped in the middle of CG step 3 (its pass over the particles), resumed from the checkpoint of step 2:
    every output equals the uninterrupted run's exactly; other settings are refused naming the checkpoint."""
    from cryohet.inference.moments import fit_moments
    from cryohet.inference.moments_state import read_cg_state
    from cryohet.io.particles import load_particles

    pset = load_particles(hinge[1].particles_star)
    opts = dict(resolution_A=RES_A, diameter_A=80.0, max_iter=4, tol=0.0, batch_size=128)
    whole = fit_moments(pset, 2, checkpoint=tmp_path / "whole.safetensors", **opts)

    def stop_in_step_3(items, desc, total):
        for i, item in enumerate(items):
            if desc.startswith("moments: CG 3/") and i == 2:
                raise _Stop(desc)
            yield item

    ckpt = tmp_path / "cut.safetensors"
    with pytest.raises(_Stop):
        fit_moments(pset, 2, checkpoint=ckpt, progress=stop_in_step_3, **opts)
    assert read_cg_state(ckpt)[0].iteration == 2
    resumed = fit_moments(pset, 2, checkpoint=ckpt, resume=True, **opts)
    assert resumed.iterations == whole.iterations == 4
    for name in ("spectrum", "eigenvalues", "components", "latents", "latent_std", "mean_basis"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name), err_msg=name)
    assert [h["relative_residual"] for h in resumed.history] == [h["relative_residual"] for h in whole.history]
    # with another number of threads the ball basis, computed again, differs within its degenerate eigenvalues:
    # the checkpoint's is used, so its coefficients still give the same maps
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        other = fit_moments(pset, 2, checkpoint=ckpt, resume=True, **opts)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(other.components, whole.components, atol=1e-4 * np.abs(whole.components).max())
    with pytest.raises(InputError, match=r"cut.safetensors.*regularisation: 0.001 \(checkpoint\) vs 0.01"):
        fit_moments(pset, 2, checkpoint=ckpt, resume=True, **{**opts, "regularisation": 1e-2})


def test_shrinkage_recovers_the_spikes_of_a_spiked_covariance():
    """Back-projected images b_m = M̄^½ (s_m + n_m) with two signal spikes (variances 6 and 2 in noise units) and
    white noise: the shrunk right-hand side has exactly the two spikes (within 10 %; the Frobenius shrinker's
    times their squared cosines), nothing in the
    Marchenko-Pastur bulk, and is less than half as far from the true M̄^½ Σ M̄^½ as the raw one; the shrinker inverts the
    spiked model's eigenvalue bias λ = ℓ (1 + γ / (ℓ − 1)) exactly."""
    from cryohet.inference.moments import shrink_rhs, spike_shrinker

    rng = np.random.default_rng(4)
    d, n = 100, 4000
    u, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    spikes = np.array([6.0, 2.0])
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    evals = rng.uniform(0.5, 3.0, d)
    mbar, half = (q * evals) @ q.T, (q * np.sqrt(evals)) @ q.T
    w = rng.standard_normal((n, 2)) * np.sqrt(spikes) @ u.T + rng.standard_normal((n, d))
    b = w @ half
    rhs = b.T @ b / n - mbar
    truth = half @ (u * spikes) @ u.T @ half
    t = {k: torch.as_tensor(v) for k, v in (("rhs", rhs), ("mbar", mbar))}
    errs = {}
    for loss in ("operator", "frobenius"):
        shrunk = shrink_rhs(t["rhs"], t["mbar"], d / n, loss).numpy()
        white = np.linalg.solve(half, np.linalg.solve(half, shrunk).T)
        ev = np.sort(np.linalg.eigvalsh(white))[::-1]
        g = d / n  # the Frobenius shrinker also scales each spike by its squared cosine with the sample's
        cos2 = 1 if loss == "operator" else (1 - g / spikes**2) / (1 + g / spikes)
        np.testing.assert_allclose(ev[:2], spikes * cos2, rtol=0.1)
        assert np.abs(ev[2:]).max() < 1e-8
        errs[loss] = np.linalg.norm(shrunk - truth)
    raw = np.linalg.norm(rhs - truth)
    assert max(errs.values()) < raw / 2, (errs, raw)
    gamma, ell = 0.25, torch.tensor([1.6, 3.0, 7.0], dtype=torch.float64)  # spikes above √γ (BBP)
    lam = ell * (1 + gamma / (ell - 1))
    np.testing.assert_allclose(spike_shrinker(lam, gamma, "operator"), ell - 1, rtol=1e-12)
    assert (spike_shrinker(torch.tensor([0.5, 1.0, 2.2]), gamma, "operator") == 0).all()  # inside (1 + √γ)² = 2.25
    noise = rng.standard_normal((n, d)) @ half  # no signal: everything inside the bulk, shrunk to 0
    assert not shrink_rhs(torch.as_tensor(noise.T @ noise / n - mbar), t["mbar"], d / n, "frobenius").any()
