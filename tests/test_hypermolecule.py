"""hypermolecule: τ recovered against the simulated hinge's truth, posterior intervals that cover it near their
nominal rate, maps along τ against the true end states, outputs through the model contract, resume, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import starfile
import torch

from cryohet.errors import InputError
from cryohet.inference.hypermol_mcmc import check_inputs
from cryohet.models.hypermolecule import affine_legendre_transform, legendre_basis
from cryohet.validation.coverage import calibrated_coverage

N, SNR = 500, 1.0
FAST = {"iterations": 10, "degree": 2, "n_steps": 30, "burn_in": 60, "final_steps": 120, "n_frames": 3,
        "n_keep": 8, "threads": 1}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from cryohet.methods.hypermolecule import METHOD
    from cryohet.runner import run_method
    from cryohet.validation.datasets import make_dataset

    root = tmp_path_factory.mktemp("hypermol")
    ds = make_dataset("hinge", root / "data", box=32, n_particles=N, snr=SNR, seed=1)
    run = root / "run"
    run_method(METHOD, {"particles": str(ds.particles_star), **FAST}, run)
    return ds, run


def test_tau_and_its_intervals_against_the_truth(fitted):
    ds, run = fitted
    post = np.load(run / "tau_posterior.npy")
    z = np.load(run / "z.npy")
    assert z.shape == (N, 1) and np.allclose(z[:, 0], post[:, 0])
    assert np.all(post[:, 2] < post[:, 3]) and np.all(post[:, 1] > 0)
    cov = calibrated_coverage(post[:, 0], post[:, 2], post[:, 3], ds.tau[:, 0])
    assert cov["spearman_abs"] > 0.85, cov         # 0.93-0.94 measured with two seeds; chance is about 0
    assert 0.7 < cov["coverage"] < 0.99, cov       # nominal 0.90; 0.82-0.86 measured
    samples = np.load(run / "tau_samples.npy")
    assert samples.shape == (N, FAST["n_keep"])
    assert np.all(np.abs(samples) <= 1)


def test_maps_along_tau_match_the_true_end_states(fitted):
    from cryohet.io.mrc import read_map
    from cryohet.models.base import load_volume_model

    ds, run = fitted
    model = load_volume_model(run)
    ends = model.volumes(np.array([[-1.0], [1.0]]))
    assert ends.shape == (2, 32, 32, 32)
    first, last = (read_map(ds.map_paths[i])[0].ravel() for i in (0, -1))
    corr = np.array([[np.corrcoef(e.ravel(), t)[0, 1] for t in (first, last)] for e in ends])
    # the sense of τ is arbitrary: one end of the model is nearer one true end, the other the other
    sense = np.sign(np.corrcoef(np.load(run / "z.npy")[:, 0], ds.tau[:, 0])[0, 1])
    matched = corr[[0, 1], [0, 1]] if sense > 0 else corr[[0, 1], [1, 0]]
    crossed = corr[[0, 1], [1, 0]] if sense > 0 else corr[[0, 1], [0, 1]]
    assert np.all(matched > crossed), corr
    files = sorted((run / "maps_along_tau").glob("tau_*.mrc"))
    assert len(files) == FAST["n_frames"]
    assert np.allclose(read_map(files[0])[0], ends[0], atol=1e-4 * np.abs(ends[0]).max())


def test_outputs_record_star_and_resume(fitted, tmp_path):
    import shutil

    from cryohet.methods.hypermolecule import METHOD
    from cryohet.runner import run_method

    ds, run = fitted
    rec = json.loads((run / "cryohet_run.json").read_text())
    kinds = {o["kind"] for o in rec["outputs"]}
    assert {"model", "latents", "particles_star", "volume_series", "plot", "report", "chimerax"} <= kinds
    model = next(o for o in rec["outputs"] if o["kind"] == "model")
    assert model["meta"]["model_type"] == "hypermolecule"
    star = starfile.read(run / "particles.star")["particles"]
    assert np.allclose(star["cryohetZ1"], np.load(run / "z.npy")[:, 0], atol=1e-5)
    assert {"cryohetStdZ1", "cryohetZ1Low", "cryohetZ1High", "cryohetFitZ"} <= set(star.columns)
    # resume: the checkpoint continues for one more iteration with the stored chains
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    run_method(METHOD, {"particles": str(ds.particles_star), **FAST, "iterations": FAST["iterations"] + 1,
                        "resume": True}, copy)
    log = (copy / "run.log").read_text()
    assert "resuming from" in log and f"EM {FAST['iterations'] + 1} " in log
    cov = calibrated_coverage(*np.load(copy / "tau_posterior.npy")[:, [0, 2, 3]].T, ds.tau[:, 0])
    assert cov["spearman_abs"] > 0.85


def test_legendre_basis_and_its_affine_change():
    tau = torch.linspace(-1, 1, 41, dtype=torch.float64)
    ours = legendre_basis(tau, 4).numpy()
    ref = np.stack([np.sqrt(2 * k + 1) * np.polynomial.legendre.legval(tau.numpy(), np.eye(5)[k]) for k in range(5)], 1)
    assert np.allclose(ours, ref)
    T = affine_legendre_transform(4, 0.6, -0.2)
    assert np.allclose(legendre_basis(0.6 * tau - 0.2, 4).numpy(), ours @ T.T)


def test_bad_input(fitted, tmp_path):
    from cryohet.methods.hypermolecule import METHOD
    from cryohet.runner import run_method

    ds, _ = fitted
    star = str(ds.particles_star)
    with pytest.raises(InputError, match="beyond Nyquist"):       # 4 Å/px: Nyquist is 8 Å
        run_method(METHOD, {"particles": star, "resolution_A": 5.0, "threads": 1}, tmp_path / "nyquist")
    assert not (tmp_path / "nyquist" / "hypermolecule.safetensors").exists()
    with pytest.raises(InputError, match="too large for memory"):
        check_inputs(N, 256, 1.0, 12, 0.0, 8.0, star)
    table = starfile.read(ds.particles_star)
    table["particles"] = table["particles"].drop(columns=["rlnDefocusU"])
    starfile.write(table, tmp_path / "no_ctf.star")
    (tmp_path / "particles.mrcs").symlink_to(ds.particles_star.parent / "particles.mrcs")
    with pytest.raises(InputError, match="no CTF"):
        run_method(METHOD, {"particles": str(tmp_path / "no_ctf.star"), "threads": 1}, tmp_path / "noctf")
