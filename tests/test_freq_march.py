"""Frequency marching (train-vae --freq_march): the circle fitted at each epoch is the one the option says, its
pixels are exactly the lattice's half-plane inside that radius, a training run fits those circles (its history)
with the decoder evaluated on correspondingly fewer pixels, and its maps are real-valued maps of the true
molecule (their per-image FSC AUC against the true maps is reported; marching is not the default: see
docs/benchmarks.md, "Neural hyper-molecule")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryohet.geometry.lattice import Lattice
from cryohet.inference.amortised import AmortisedInference
from cryohet.inference.freq_march import START, FrequencyMarch, march_epochs, march_radius
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.neural import VolumeConfig
from cryohet.runner import run_method
from cryohet.validation.datasets import make_dataset
from cryohet.validation.score import score_run


def test_the_schedule_widens_linearly_then_fits_the_whole_circle() -> None:
    assert march_epochs(20, 0.5) == 10 and march_epochs(20, 0.0) == 0
    got = [march_radius(e, 20, 0.5) for e in range(1, 21)]
    want = [START + (1 - START) * (e - 1) / 10 for e in range(1, 11)] + [1.0] * 10
    np.testing.assert_allclose(got, want)
    assert got[0] == 0.25 and all(a < b for a, b in zip(got[:10], got[1:11], strict=True))
    assert [march_radius(e, 5, 0.0) for e in range(1, 6)] == [1.0] * 5
    with pytest.raises(ValueError, match="marching fraction"):
        march_epochs(10, 1.0)


def test_beta_warms_up_geometrically_from_one_over_zdim_to_beta() -> None:
    """--beta_warmup W: the KL weight of epoch e is β_e / (2 × fitted pixels), β_e rising geometrically from 1/zdim
    (epoch 1) to β (epoch W + 1 on); with frequency marching it is per fitted pixel of the epoch's circle."""
    points = Lattice(16, 2.0).half_plane()
    cfg = VolumeConfig(box=16, apix=2.0, zdim=4, dec_dim=8)

    def betas(beta: float, warmup: int, march: float = 0.0) -> list[float]:
        obj = AmortisedInference(cfg, points, {"enc_layers": 1, "enc_dim": 8}, beta, march=march,
                                 beta_warmup=warmup)
        out = []
        for e in range(1, 6):
            obj.start_epoch(e, 5)
            out.append(obj.kl_weight * 2 * (len(points) if obj.active is None else len(obj.active)))
        return out

    np.testing.assert_allclose(betas(2.0, 2), [0.25, 0.25 * 8 ** 0.5, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(betas(2.0, 2, march=0.4), betas(2.0, 2))
    np.testing.assert_allclose(betas(2.0, 0), [2.0] * 5)
    np.testing.assert_allclose(betas(0.0, 3), [0.25] * 5)  # β = 1/zdim: nothing to warm up
    np.testing.assert_allclose(betas(0.1, 3), [0.1] * 5)


@pytest.mark.parametrize("box", [32, 48])
def test_the_fitted_pixels_are_the_half_plane_inside_the_epochs_circle(box: int) -> None:
    lattice = Lattice(box, 2.0)
    points = lattice.half_plane()
    march = FrequencyMarch(points.kxy, 0.5, 0.5)
    for epoch in range(1, 11):
        active, radius = march.select(epoch, 10)
        assert radius == pytest.approx(0.5 * march_radius(epoch, 10, 0.5))
        if epoch > 5:
            assert active is None
            continue
        truth = lattice.half_plane(radius * box).flat  # the lattice's own pixels inside that radius
        assert torch.equal(torch.sort(points.flat[active]).values, torch.sort(truth).values)


@pytest.fixture(scope="module")
def hinge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small benchmark with true maps: the hinge motion, box 32, 800 particles, SNR 1."""
    out = tmp_path_factory.mktemp("hinge_march")
    make_dataset("hinge", out, box=32, n_particles=800, snr=1.0, seed=1)
    return out


def test_a_marching_run_fits_the_scheduled_circles_in_fewer_pixel_evaluations(hinge: Path, tmp_path: Path) -> None:
    out = tmp_path / "march"
    run_method(TRAIN_VAE, dict(particles=str(hinge / "particles.star"), epochs=8, enc_dim=64, dec_dim=64,
                               batch_size=32, lr=1e-3, threads=1, seed=0, freq_march=0.5), out)
    history = json.loads((out / "config.json").read_text())["history"]
    radii = [h["fit_radius_cpp"] for h in history]
    np.testing.assert_allclose(radii, [0.5 * march_radius(e, 8, 0.5) for e in range(1, 9)], rtol=1e-6)
    assert json.loads((out / "config.json").read_text())["freq_march"] == 0.5
    # pixels evaluated per image over the run, relative to the whole circle every epoch (∝ decoder FLOPs)
    pts = Lattice(32, 4.0).half_plane()
    r = torch.linalg.vector_norm(pts.kxy, dim=-1)
    work = sum(int((r < rad).sum()) for rad in radii) / (8 * len(pts))
    assert 0.6 < work < 0.7
    # the CPU time of the marching epochs falls with their pixel count (the decoder dominates a step)
    cpu = [h["cpu_seconds"] for h in history]
    assert np.mean(cpu[:2]) < 0.8 * np.mean(cpu[4:])
    summary = score_run(out, hinge, n_per_state=2, max_states=10)["summary"]
    print(f"per-image FSC AUC with marching: {summary['fsc_auc']:.3f} (homogeneous-truth mean map "
          f"{summary['mean_map_fsc_auc']:.3f}); pixel evaluations {work:.2f} of the whole circle's")
    assert 0.1 < summary["fsc_auc"] <= 1.0
