"""The encoder's filters from the particles' covariance (``train-vae --filters_from covariance``): on images made
from a known motion the leading filter reads each image's coordinate along it; in train-vae (its default with the
anchored decoder) the filters are fixed, kept by resuming, and the same on two DDP ranks as on one."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_tools import train_vae_on_two_ranks
from safetensors.torch import load_file
from scipy.spatial.transform import Rotation
from test_vae import hinge  # noqa: F401  (test_vae's hinge: 1000 particles, box 32, SNR 1)

from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.inference.filter_covariance import POWER_PASSES, covariance_filters
from cryohet.inference.pose_filters import PoseFilterBank
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.runner import run_method
from cryohet.validation.metrics import spearman_pc1

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
BOX, FREQ = 24, 0.25
SETTINGS = dict(enc_dim=64, dec_dim=64, batch_size=32, lr=1e-3, threads=1)


def _blob(box: int, centre: tuple[float, float, float], sigma: float) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))


def _motion_responses(rot: torch.Tensor, motion_px: tuple[float, float, float], noise: float, seed: int
                      ) -> tuple[float, float, torch.Tensor, PoseFilterBank, Callable]:
    """Residuals a_i · CTF_i · slice_i(u) + noise at the views ``rot`` (u: a blob moved by ± ``motion_px``,
    a_i standard normal; the noise's s.d. ``noise`` times the signal's in the filters' circle), streamed in
    batches of 100: |r| of the leading covariance filter's responses with a_i, |r| of the motion's own map as the
    filter (the best a filter can do), the two filters and the bank, and the stream."""
    points = Lattice(BOX, 4.0).half_plane()
    bank = PoseFilterBank(2, BOX, points.kxy, points.weight, FREQ, torch.Generator().manual_seed(0), fixed=True)
    u = _blob(BOX, motion_px, 2.5) - _blob(BOX, tuple(-m for m in motion_px), 2.5)
    n = len(rot)
    rng = np.random.default_rng(seed)
    a = torch.as_tensor(rng.normal(size=n), dtype=torch.float32)
    defocus = torch.as_tensor(rng.uniform(0.5, 1.5, size=(n, 1)), dtype=torch.float32)
    ctf = torch.cos(40 * defocus * points.kxy.norm(dim=-1) ** 2)  # a CTF-like sign pattern
    signal = torch.view_as_real(Projector(u).slice_points(rot, points.kxy) * ctf * a[:, None])
    inside = points.kxy.norm(dim=-1) <= FREQ
    noise_sd = noise * float(signal[:, inside].std())
    residual = signal + noise_sd * torch.randn(signal.shape, generator=torch.Generator().manual_seed(seed + 2))

    def signals():
        for s in range(0, n, 100):
            yield rot[s:s + 100], ctf[s:s + 100], residual[s:s + 100]

    f = covariance_filters(bank, signals, 2, seed=0)
    r = abs(np.corrcoef((bank.adjoint(rot, ctf, residual) @ f)[:, 0].numpy(), a.numpy())[0, 1])
    truth = PoseFilterBank(1, BOX, points.kxy, points.weight, FREQ, torch.Generator(), fixed=True)
    truth.set_maps(u[None])
    best = abs(np.corrcoef(truth(rot, ctf, residual)[:, 0].numpy(), a.numpy())[0, 1])
    return r, best, f, bank, signals


def test_the_leading_filter_reads_each_images_coordinate_along_the_motion() -> None:
    """Uniform views, SNR about 0.3 in the filters' circle: the leading filter's responses follow a_i (|r| above
    0.95 of the motion's own); the filters are zero outside the resolution circle, of unit RMS, their largest real
    part positive, the same for the same seed, and made in 5 passes."""
    rot = torch.as_tensor(Rotation.random(600, random_state=2).as_matrix(), dtype=torch.float32)
    r, best, f, bank, signals = _motion_responses(rot, (3.0, 0.0, 0.0), 2.0, 1)
    print(f"|r| of the leading filter's responses with the coordinate {r:.3f}, of the motion's own {best:.3f}")
    assert r > 0.95 * best, (r, best)
    assert f.shape == (2 * bank.n_voxels, 2)
    outside = (bank.voxel_radii() > FREQ * BOX + 1e-6).repeat(2)
    assert float(f[outside].abs().max()) == 0.0
    torch.testing.assert_close(f.pow(2).mean(0), torch.ones(2))
    real = f[:bank.n_voxels]
    assert (real.gather(0, real.abs().argmax(0, keepdim=True)) > 0).all()
    passes = []

    def counted():
        passes.append(1)
        return signals()

    torch.testing.assert_close(covariance_filters(bank, counted, 2, seed=0), f)
    assert len(passes) == POWER_PASSES
    with pytest.raises(ValueError, match="passes must be at least 2"):
        covariance_filters(bank, signals, 2, passes=1)


@pytest.mark.parametrize("views, motion_px", [("tilts up to 30°", (0.0, 0.0, 3.0)),
                                              ("80 % near the top view", (3.0, 0.0, 0.0))])
def test_preferred_views_do_not_drown_the_motion(views: str, motion_px: tuple[float, float, float]) -> None:
    """Voxels that few views reach are not amplified until their noise makes the leading eigenvector (the density
    floor): with views no more tilted than 30° and a motion along z (Fourier content near the missing cone), and
    with 80 % of the views within about 15° of the top view, the leading filter still reads each image's
    coordinate (|r| above 0.8 of the motion's own; without the floor 0.07 and 0.08)."""
    rng = np.random.default_rng(5)
    n = 600
    tilt = (np.degrees(np.arccos(rng.uniform(np.cos(np.radians(30)), 1, n))) if views.startswith("tilts")
            else np.where(rng.random(n) < 0.8, np.abs(rng.normal(0, 15, n)),
                          np.degrees(np.arccos(rng.uniform(-1, 1, n)))))
    rot = Rotation.from_euler("ZYZ", np.stack([rng.uniform(0, 360, n), tilt, rng.uniform(0, 360, n)], 1),
                              degrees=True)
    r, best, *_ = _motion_responses(torch.as_tensor(rot.as_matrix(), dtype=torch.float32), motion_px, 2.0, 1)
    print(f"{views}: |r| {r:.3f}, the motion's own {best:.3f}")
    assert r > 0.8 * best, (r, best)


def test_train_vae_with_covariance_filters(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """The default (``--filters_from auto`` with the anchored decoder): 3 fixed filters at 30 Å from the
    covariance, recorded in the run, unchanged by training and by resuming; the latent follows the hinge angle.
    Without the anchor, auto is the learnt filters, and covariance is refused (it needs the residual)."""
    star = str(hinge / "particles.star")
    run_method(TRAIN_VAE, dict(particles=star, epochs=3, **SETTINGS), tmp_path / "vae")
    inference = json.loads((tmp_path / "vae" / "config.json").read_text())["inference"]
    assert inference["encoder_filters"] == 3 and inference["filters_from"] == "covariance"
    assert inference["filter_freq"] == pytest.approx(4.0 / 30.0)
    log = (tmp_path / "vae" / "run.log").read_text()
    assert "3 filters from the covariance of 1000 particles" in log
    assert f"initialisation, pass {POWER_PASSES}: done in" in log  # each pass had its progress bar
    values = load_file(str(tmp_path / "vae" / "model.safetensors"))["filters.values"]
    assert values.shape[1] == 3 and float(values.abs().max()) > 0
    rho = spearman_pc1(np.load(tmp_path / "vae" / "z.npy"), np.load(hinge / "ground_truth.npz")["tau"])
    print(f"hinge |Spearman| PC1 with covariance filters: {rho:.3f}")
    assert rho > 0.8, rho
    run_method(TRAIN_VAE, dict(particles=star, epochs=4, resume=True, **SETTINGS), tmp_path / "vae")
    assert len(json.loads((tmp_path / "vae" / "config.json").read_text())["history"]) == 4
    torch.testing.assert_close(load_file(str(tmp_path / "vae" / "model.safetensors"))["filters.values"], values)
    run_method(TRAIN_VAE, dict(particles=star, epochs=1, anchor="none", **SETTINGS), tmp_path / "unanchored")
    inference = json.loads((tmp_path / "unanchored" / "config.json").read_text())["inference"]
    assert inference["encoder_filters"] == 32 and "filters_from" not in inference
    with pytest.raises(ValueError, match="covariance needs the residual"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=1, filters_from="covariance", anchor="none", **SETTINGS),
                   tmp_path / "bad")


def test_auto_resumes_a_run_with_the_filters_it_used(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """A run with learnt filters (as every run before covariance became the default) resumes under auto with
    learnt filters, not covariance ones, which its checkpoint does not hold."""
    star = str(hinge / "particles.star")
    run_method(TRAIN_VAE, dict(particles=star, epochs=1, filters_from="learnt", **SETTINGS), tmp_path / "vae")
    run_method(TRAIN_VAE, dict(particles=star, epochs=2, resume=True, **SETTINGS), tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert len(config["history"]) == 2 and config["inference"]["encoder_filters"] == 32
    assert "filters_from" not in config["inference"]


def test_two_ddp_ranks_estimate_the_one_rank_filters(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """Each rank streams half of the particles and the sums are reduced: the filter is the one rank's."""
    values = dict(particles=str(hinge / "particles.star"), epochs=1, filters_from="covariance",
                  covariance_filters=1, amp="no", device="cpu", **SETTINGS)
    one, two = tmp_path / "one", tmp_path / "two"
    run_method(TRAIN_VAE, values, one)
    res = train_vae_on_two_ranks(values, two, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 rank(s)" in (two / "run.log").read_text()
    a = load_file(str(one / "model.safetensors"))["filters.values"]
    b = load_file(str(two / "model.safetensors"))["filters.values"]
    torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * float(a.abs().max()))
