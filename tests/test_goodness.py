"""Per-particle goodness of fit on a simulated set with known junk and a rare state (benchmark-make --dataset junk).

Ground truth: the simulation's noise (unit variance per pixel, so E|N(k)|² = box² per Fourier pixel of the
unnormalised transform), its true map (the fit of a good particle under it is pure noise: cryohetFitZ ~ N(0, 1)),
and which rows are junk (cryohetTrueJunk) or the rare state. Thresholds are the measured values (box 32, 600
particles, SNR 0.1, seed 0; see docs/benchmarks.md) less a margin.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from cryohet.errors import InputError
from cryohet.io.mrc import read_map
from cryohet.io.particles import load_particles
from cryohet.io.star import read_star
from cryohet.methods import benchmark_make, principal_volumes, reconstruct, select
from cryohet.record import read_record
from cryohet.runner import run_method
from cryohet.simulate.junk import JUNK_COLUMN, JUNK_KINDS
from cryohet.validation.datasets import load_dataset
from cryohet.validation.goodness import FIT_Z, RESIDUAL_Z, maps_predictor, score_particles
from cryohet.validation.outliers import outlier_report, roc_auc

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
N, BOX = 600, 32


@pytest.fixture(scope="module")
def junk_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("junk")
    run_method(benchmark_make.METHOD, {"dataset": "junk", "box": BOX, "n_particles": N, "snr": 0.1,
                                       "threads": 1}, out)
    return out


def _truth(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / "ground_truth.npz") as gt:
        return gt["junk"], gt["state"]


def _report(star: Path, folder: Path):
    junk, state = _truth(folder)
    return outlier_report(read_star(star)["particles"][FIT_Z].to_numpy(), junk, state, 1, JUNK_KINDS)


def test_junk_dataset(junk_set: Path) -> None:
    ds = load_dataset(junk_set)
    junk, state = _truth(junk_set)
    assert ds.n_states == 2 and ds.kind == "discrete"
    assert (junk > 0).sum() == N // 10 and np.bincount(junk, minlength=4)[1:].tolist() == [N // 30] * 3
    assert (state[junk > 0] == 0).all()
    assert 4 <= ((state == 1) & (junk == 0)).sum() <= 24  # 2 % of 600 drawn: 12 ± 3.4
    np.testing.assert_array_equal(read_star(ds.particles_star)["particles"][JUNK_COLUMN].to_numpy(), junk)
    # the pure-noise images are the simulation's unit-variance noise and nothing else
    noise = load_particles(ds.particles_star).reader().read(np.flatnonzero(junk == 1))
    assert noise.var() == pytest.approx(1.0, rel=0.03) and abs(noise.mean()) < 0.01


def test_scores_under_the_true_map(junk_set: Path) -> None:
    """Against the true map, the noise model is the simulated noise and a good particle's fit is pure noise."""
    pset = load_particles(junk_set / "particles.star")
    truth, _ = read_map(junk_set / "maps" / "state_000.mrc")
    scores = score_particles(pset, maps_predictor(torch.as_tensor(truth)), batch_size=128)
    sigma2 = scores.noise.sigma2[1:BOX // 2]
    np.testing.assert_allclose(sigma2, BOX**2, rtol=0.1)  # unit real-space noise: box² per Fourier pixel
    junk, state = _truth(junk_set)
    rep = outlier_report(scores.fit_z, junk, state, 1, JUNK_KINDS)
    assert abs(rep.good_mean) < 0.3 and 0.85 < rep.good_sd < 1.15
    good = (junk == 0) & (state == 0)
    assert abs(scores.residual_z[good].mean()) < 0.3 and 0.85 < scores.residual_z[good].std() < 1.15
    assert rep.auc["noise"] > 0.99 and rep.auc["off_centre"] > 0.99 and rep.auc["other_molecule"] > 0.85


def test_reconstruct_ranks_junk_worst_and_select_cuts_it(junk_set: Path, tmp_path: Path) -> None:
    run_method(reconstruct.METHOD, {"particles": str(junk_set / "particles.star"), "threads": 1}, tmp_path / "rec")
    star = tmp_path / "rec" / "particles.star"
    table = read_star(star)["particles"]
    assert {FIT_Z, RESIDUAL_Z} <= set(table.columns) and np.isfinite(table[FIT_Z]).all()
    assert any(o.path == "fit_z.png" for o in read_record(tmp_path / "rec").of_kind("plot"))
    rep = _report(star, junk_set)
    # measured: AUC all 0.955, noise 1.000, off-centre 1.000, other molecule 0.864; rare median 1.40 (rank 0.15)
    assert rep.auc["all"] > 0.92 and rep.auc["noise"] > 0.99 and rep.auc["off_centre"] > 0.99
    assert rep.auc["other_molecule"] > 0.8
    assert abs(rep.good_mean) < 0.3 and 0.85 < rep.good_sd < 1.15
    # the rare state is not thrown out with the junk: its median is far below the junk's, outside the worst 10 %
    assert rep.median["rare"] < 0.4 * min(rep.median["noise"], rep.median["off_centre"])
    assert rep.rare_rank > 0.1

    run_method(select.METHOD, {"run": str(tmp_path / "rec"), "max_fit_z": 3.0, "threads": 1}, tmp_path / "sel")
    kept = np.loadtxt(tmp_path / "sel" / "selected_indices.txt", dtype=np.int64)
    junk, state = _truth(junk_set)
    keep = np.zeros(N, dtype=bool)
    keep[kept] = True
    assert not keep[(junk == 1) | (junk == 3)].any()  # every pure-noise and off-centre image is cut
    assert keep[(junk == 0) & (state == 0)].mean() > 0.97
    assert keep[(junk == 0) & (state == 1)].mean() >= 0.5


def test_principal_volumes_ranks_junk_worst(junk_set: Path, tmp_path: Path) -> None:
    """A latent model can explain an empty image by an empty prediction: scored against its mean map's
    evidence, the junk is still ranked worst and the rare state kept."""
    run_method(principal_volumes.METHOD, {"particles": str(junk_set / "particles.star"), "n_components": 2,
                                          "max_iter": 8, "movie_frames": 2, "threads": 1}, tmp_path)
    rep = _report(tmp_path / "particles.star", junk_set)
    # measured: AUC all 0.913, noise 1.000, off-centre 0.983, other molecule 0.757; rare median 0.90 (rank 0.22)
    assert rep.auc["all"] > 0.88 and rep.auc["noise"] > 0.99 and rep.auc["off_centre"] > 0.95
    assert rep.median["rare"] < 0.5 * min(rep.median["noise"], rep.median["off_centre"])
    assert rep.rare_rank > 0.1


def test_roc_auc_is_the_mann_whitney_statistic() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=200), np.round(rng.normal(0.7, 1.0, size=50), 1)  # ties too
    u = mannwhitneyu(pos, neg).statistic
    assert roc_auc(neg, pos) == pytest.approx(u / (len(neg) * len(pos)))
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([2, 3], [0, 1]) == 0.0


def test_select_without_fit_columns_names_the_star(junk_set: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cryohetFitZ") as err:
        run_method(select.METHOD, {"run": str(junk_set), "max_fit_z": 3.0, "threads": 1}, tmp_path)
    assert "particles.star" in str(err.value)
    assert not (tmp_path / "particles_selected.star").exists()
