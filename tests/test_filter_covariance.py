"""The encoder's filters from the particles' covariance (``train-vae --filters_from covariance``): on images made
from a known motion the leading filter reads each image's coordinate along it; in train-vae (its default with the
anchored decoder) the filters are fixed, kept by resuming, and the same on two DDP ranks as on one."""
from __future__ import annotations

import json
import os
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
from cryohet.inference.filter_covariance import covariance_filters
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


def test_the_leading_filter_reads_each_images_coordinate_along_the_motion() -> None:
    """Residuals a_i · CTF_i · slice_i(u) + noise (u: a blob moved sideways, a_i standard normal, SNR about 0.3 in
    the filters' circle): the leading filter's responses follow a_i (|r| > 0.9), streamed in batches; the filters
    are zero outside the resolution circle, of unit RMS, their largest real part positive, and the same for the same
    seed."""
    points = Lattice(BOX, 4.0).half_plane()
    bank = PoseFilterBank(2, BOX, points.kxy, points.weight, FREQ, torch.Generator().manual_seed(0), fixed=True)
    u = _blob(BOX, (3.0, 0.0, 0.0), 2.5) - _blob(BOX, (-3.0, 0.0, 0.0), 2.5)
    n = 600
    rng = np.random.default_rng(1)
    rot = torch.as_tensor(Rotation.random(n, random_state=2).as_matrix(), dtype=torch.float32)
    a = torch.as_tensor(rng.normal(size=n), dtype=torch.float32)
    defocus = torch.as_tensor(rng.uniform(0.5, 1.5, size=(n, 1)), dtype=torch.float32)
    ctf = torch.cos(40 * defocus * points.kxy.norm(dim=-1) ** 2)  # a CTF-like sign pattern
    clean = Projector(u).slice_points(rot, points.kxy) * ctf * a[:, None]
    signal = torch.view_as_real(clean)
    inside = points.kxy.norm(dim=-1) <= FREQ
    noise_sd = 2.0 * float(signal[:, inside].std())
    residual = signal + noise_sd * torch.randn(signal.shape, generator=torch.Generator().manual_seed(3))
    passes = []

    def signals():
        passes.append(1)
        for s in range(0, n, 100):
            yield rot[s:s + 100], ctf[s:s + 100], residual[s:s + 100]

    f = covariance_filters(bank, signals, 2, seed=0)
    assert len(passes) == 5 and f.shape == (2 * bank.n_voxels, 2)
    outside = (bank.voxel_radii() > FREQ * BOX + 1e-6).repeat(2)
    assert float(f[outside].abs().max()) == 0.0
    torch.testing.assert_close(f.pow(2).mean(0), torch.ones(2))
    real = f[:bank.n_voxels]
    assert (real.gather(0, real.abs().argmax(0, keepdim=True)) > 0).all()
    responses = bank.adjoint(rot, ctf, residual) @ f
    r = abs(np.corrcoef(responses[:, 0].numpy(), a.numpy())[0, 1])
    truth = PoseFilterBank(1, BOX, points.kxy, points.weight, FREQ, torch.Generator(), fixed=True)
    truth.set_maps(u[None])  # the motion itself as the filter: the best a filter can do
    best = abs(np.corrcoef(truth(rot, ctf, residual)[:, 0].numpy(), a.numpy())[0, 1])
    print(f"|r| of the leading filter's responses with the coordinate {r:.3f}, of the motion's own {best:.3f}")
    assert r > 0.95 * best, (r, best)
    torch.testing.assert_close(covariance_filters(bank, signals, 2, seed=0), f)
    with pytest.raises(ValueError, match="passes must be at least 2"):
        covariance_filters(bank, signals, 2, passes=1)


def test_train_vae_with_covariance_filters(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """The default (``--filters_from auto`` with the anchored decoder): 3 fixed filters at 30 Å from the
    covariance, recorded in the run, unchanged by training and by resuming; the latent follows the hinge angle.
    Without the anchor, auto is the learnt filters, and covariance is refused (it needs the residual)."""
    star = str(hinge / "particles.star")
    run_method(TRAIN_VAE, dict(particles=star, epochs=3, **SETTINGS), tmp_path / "vae")
    inference = json.loads((tmp_path / "vae" / "config.json").read_text())["inference"]
    assert inference["encoder_filters"] == 3 and inference["filters_from"] == "covariance"
    assert inference["filter_freq"] == pytest.approx(4.0 / 30.0)
    assert "3 filters from the covariance of 1000 particles" in (tmp_path / "vae" / "run.log").read_text()
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
