"""train-vae's anchor (``--anchor homogeneous``): the decoder as a residual on the homogeneous reconstruction of
the same particles. Conventions (the base sliced as its map is projected), the untrained network giving the base
at every latent point, model files (with and without a base), and, against the true maps of a simulated set at low
SNR, per-particle maps at least as close to the truth as the homogeneous reconstruction's with the default that
also learns a hinge's latent at SNR 1."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vae import hinge  # noqa: F401  (test_vae's hinge: 1000 particles, box 32, SNR 1)

from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.fourier import fft3c, ifft3c, radius_grid
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.neural import NeuralVolume, VolumeConfig, load_volume, save_model
from cryohet.runner import run_method
from cryohet.validation.datasets import load_dataset, make_dataset
from cryohet.validation.metrics import spearman_pc1
from cryohet.validation.score import homogeneous_map, score_run

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
BOX = 32


def _smooth_map(seed: int) -> torch.Tensor:
    """A random real map with most of its power below a third of Nyquist (box³)."""
    g = torch.Generator().manual_seed(seed)
    F = fft3c(torch.randn((BOX,) * 3, generator=g, dtype=torch.float64))
    return ifft3c(F * torch.exp(-(radius_grid(BOX, 3).double() / 5) ** 2)).real.float()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b.conj()).sum().real / (a.abs().norm() * b.abs().norm()))


def test_anchored_volume_starts_at_its_base_slices_as_it_projects_and_round_trips(tmp_path: Path) -> None:
    cfg = VolumeConfig(box=BOX, apix=4.0, dec_dim=32, seed=5, data_scale=3.0, anchor=True)
    model = NeuralVolume(cfg).eval()
    base = _smooth_map(1)
    model.set_base(base)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    # the untrained residual is zero: every latent point gives the base map (inside the resolution circle)
    inside = ifft3c(fft3c(base.double()) * (radius_grid(BOX, 3) < BOX / 2)).real.numpy()
    np.testing.assert_allclose(model.volumes(z.numpy()), np.broadcast_to(inside, (3,) + inside.shape),
                               atol=1e-5 * float(np.abs(inside).max()))
    # a trained residual (a random output layer): the slices, times the data scale, are the Fourier slices of
    # the maps the model returns, base included
    with torch.no_grad():
        model.mlp.out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    vols = model.volumes(z.numpy())
    A = torch.as_tensor(euler_to_matrix(random_euler(3, np.random.default_rng(1))), dtype=torch.float32)
    points = Lattice(BOX, 4.0).half_plane()
    with torch.no_grad():
        pred = model.slices(A, z, points.kxy) * cfg.data_scale
    pred = torch.complex(pred[..., 0], pred[..., 1])
    low = points.kxy.norm(dim=1) < 0.3
    base_only = points.take(Projector(base).slice(A))
    for b in range(3):
        ref = points.take(Projector(torch.from_numpy(vols[b])).slice(A[b:b + 1]))[0]
        assert _corr(pred[b, low], ref[low]) > 0.99
        assert _corr(pred[b, low] - base_only[b, low], ref[low] - base_only[b, low]) > 0.95  # the residual too
    # the model file carries the base; a model without one (files before the anchor) loads as before
    path = save_model(tmp_path / "m.safetensors", model, {"kind": "none"},
                      {f"decoder.{k}": v for k, v in model.state_dict().items()})
    again = load_volume(path)
    assert again.cfg.anchor and torch.equal(again.base_map, base)
    np.testing.assert_array_equal(again.volumes(z.numpy()), vols)
    plain = NeuralVolume(VolumeConfig(box=BOX, apix=4.0, dec_dim=32, seed=5)).eval()
    meta_cfg = {k: v for k, v in json.loads(plain.cfg.to_json()).items() if k != "anchor"}  # as written before
    old = save_model(tmp_path / "old.safetensors", plain, {"kind": "none"},
                     {f"decoder.{k}": v for k, v in plain.state_dict().items()}, {"config": json.dumps(meta_cfg)})
    loaded = load_volume(old)
    assert not loaded.cfg.anchor and not hasattr(loaded, "base_map")
    np.testing.assert_array_equal(loaded.volumes(z.numpy()), plain.volumes(z.numpy()))


def test_beyond_a_resolution_limit_the_anchored_maps_are_the_homogeneous_map() -> None:
    """Fitted only inside --res_limit_A (here half of Nyquist), the network has learnt nothing beyond it: the maps
    are the base plus the network inside the fitted circle, the whole homogeneous map (the base over its fraction)
    from there to Nyquist, and zero beyond Nyquist."""
    cfg = VolumeConfig(box=BOX, apix=4.0, dec_dim=32, seed=5, max_freq=0.25, anchor=True, anchor_fraction=0.8)
    model = NeuralVolume(cfg).eval()
    homogeneous = _smooth_map(1)
    model.set_base(homogeneous)
    with torch.no_grad():
        model.mlp.out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    vol = torch.from_numpy(model.volumes(np.zeros((1, 8), np.float32))[0]).double()
    F, H, r = fft3c(vol), fft3c(homogeneous.double()), radius_grid(BOX, 3)
    fitted, annulus = r < BOX * cfg.max_freq, (r >= BOX * cfg.max_freq) & (r < BOX / 2)
    torch.testing.assert_close(F[annulus], H[annulus], rtol=0, atol=1e-6 * float(H.abs().max()))
    assert float(F[r >= BOX / 2].abs().max()) < 1e-6 * float(H.abs().max())
    assert float((F[fitted] - 0.8 * H[fitted]).abs().max()) > 1e-4 * float(H.abs().max())  # the network's part


@pytest.fixture(scope="module")
def low_snr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdK open -> closed interpolation, 600 particles, box 32 at 4 Å/px, SNR 0.05."""
    out = tmp_path_factory.mktemp("anchor_data")
    make_dataset("interpolation", out, box=BOX, apix=4.0, n_particles=600, snr=0.05, n_states=10, seed=2)
    return out


@pytest.mark.one_stack("current")
def test_the_default_learns_the_hinge_and_gives_at_least_the_homogeneous_map_at_low_snr(
        hinge: Path, low_snr: Path, tmp_path: Path) -> None:  # noqa: F811  (the fixture imported above)
    """One default for both regimes (``--anchor homogeneous --anchor_fraction 0.8 --beta 1 --beta_warmup 2``): at
    SNR 1 its latent follows the hinge angle (5 epochs, as ``bench_vae_anchor.py hinge``; the full anchor gave
    |Spearman| 0.02 there), and at SNR 0.05 its per-particle maps are at least as close to each particle's true map
    (FSC AUC) as the homogeneous reconstruction's, and closer than cryoDRGN's decoder at cryoDRGN's β (1/zdim)."""
    run_method(TRAIN_VAE, dict(particles=str(hinge / "particles.star"), epochs=5, enc_dim=128, dec_dim=128,
                               batch_size=32, lr=1e-3, threads=1), tmp_path / "hinge")
    rho = spearman_pc1(np.load(tmp_path / "hinge" / "z.npy"), np.load(hinge / "ground_truth.npz")["tau"])
    common = dict(particles=str(low_snr / "particles.star"), epochs=6, enc_dim=64, dec_dim=64, batch_size=32,
                  lr=1e-3, threads=1)
    homog = homogeneous_map(load_dataset(low_snr))
    scores = {}
    for name, extra in (("default", {}), ("cryodrgn", {"anchor": "none", "beta": 0.0, "beta_warmup": 0})):
        run_method(TRAIN_VAE, dict(**extra, **common), tmp_path / name)
        scores[name] = score_run(tmp_path / name, low_snr, n_per_state=3, max_states=5, n_images=10,
                                 homogeneous=homog)["summary"]
    ref = scores["default"]["homogeneous_fsc_auc"]
    got = {k: v["fsc_auc"] for k, v in scores.items()}
    print(f"hinge |Spearman| PC1 {rho:.3f}; FSC AUC to the true maps at SNR 0.05: default {got['default']:.4f}, "
          f"unanchored at beta 1/zdim {got['cryodrgn']:.4f}, homogeneous map {ref:.4f}")
    assert rho > 0.5, rho
    assert got["default"] >= ref - 1e-3
    assert got["default"] > got["cryodrgn"]


def test_an_anchored_autodecoder_resumes_to_the_uninterrupted_run(low_snr: Path, tmp_path: Path) -> None:
    """The base map travels in the checkpoint: a run stopped after epoch 1 and resumed is the uninterrupted one."""
    common = dict(particles=str(low_snr / "particles.star"), enc_dim=16, dec_dim=16, batch_size=64, lr=1e-3,
                  anchor="homogeneous", inference="autodecoder", amp="no", threads=1)
    run_method(TRAIN_VAE, dict(epochs=2, **common), tmp_path / "whole")
    run_method(TRAIN_VAE, dict(epochs=1, **common), tmp_path / "part")
    run_method(TRAIN_VAE, dict(epochs=2, resume=True, **common), tmp_path / "part")
    a, b = (load_volume(tmp_path / d / "model.safetensors") for d in ("whole", "part"))
    assert a.cfg.anchor and float(a.base_map.abs().max()) > 0
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_the_base_of_a_large_set_is_reconstructed_from_a_bounded_draw(low_snr: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--anchor_particles``: the base reads only the drawn particles (half from each half-set), so a 10⁶-particle
    set has no pass over all its images before the first epoch; the map from 400 of 600 particles is the same
    map, up to the noise of fewer images, and 0 or a cap above the set's size reads every particle once."""
    from cryohet.inference.fit_neural import homogeneous_base
    from cryohet.inference.trainer import Hooks, TrainOptions
    from cryohet.io.mrc import read_map
    from cryohet.io.particles import load_particles
    from cryohet.io.reader import ImageReader

    reads: list[int] = []
    original = ImageReader.read

    def counted(reader: ImageReader, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        reads.extend(np.asarray(rows).tolist())
        return original(reader, rows, out)

    monkeypatch.setattr(ImageReader, "read", counted)
    pset = load_particles(str(low_snr / "particles.star"))
    opts, hooks = TrainOptions(seed=3), Hooks()
    maps = {}
    for cap in (0, 1000, 400):
        reads.clear()
        maps[cap] = homogeneous_base(pset, BOX, opts, "cpu", hooks, cap)
        expect = 400 if cap == 400 else 600
        assert len(reads) == len(set(reads)) == expect, cap  # each drawn particle read once
    torch.testing.assert_close(maps[1000], maps[0])
    dset = load_dataset(low_snr)
    truth = torch.as_tensor(sum(w * read_map(p)[0] for w, p in zip(dset.populations, dset.map_paths)),
                            dtype=torch.float32)
    low = radius_grid(BOX, 3) < BOX / 6  # the shells where 600 images at SNR 0.05 carry signal
    full_corr = _corr(fft3c(maps[0])[low], fft3c(truth)[low])
    part_corr = _corr(fft3c(maps[400])[low], fft3c(truth)[low])
    print(f"base against the mean true map below {4.0 * 6:.0f} Å: all 600 {full_corr:.3f}, 400 drawn {part_corr:.3f}")
    assert part_corr > 0.9 * full_corr and part_corr > 0.5


def test_the_residual_encoder_input_is_the_image_less_the_bases_projection(low_snr: Path, tmp_path: Path) -> None:
    """``--encoder_input residual``: the encoder sees sign(CTF) × (image − CTF × the base map's slice at the pose), so
    an image that is exactly the base's CTF-weighted projection encodes as an empty one (the loader then prepares
    no encoder image); it needs the anchor. The
    default (auto) is residual with the anchor, recorded in the run's settings, and the image without it."""
    from cryohet.inference.amortised import AmortisedInference

    cfg = VolumeConfig(box=BOX, apix=4.0, dec_dim=32, seed=5, data_scale=3.0, anchor=True)
    points = Lattice(BOX, 4.0).half_plane()
    settings = {"enc_layers": 2, "enc_dim": 16, "encoder_input": "residual"}
    obj = AmortisedInference(cfg, points, settings).eval()
    obj.decoder.set_base(_smooth_map(3))
    g = torch.Generator().manual_seed(1)
    rot = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(2))), dtype=torch.float32)
    ctf = torch.rand(4, len(points), generator=g) * 2 - 1
    y = obj.decoder.base_slices(rot, points.kxy) * ctf[..., None]
    noise = torch.randn(y.shape, generator=g)
    from cryohet.data.prepare import ImageBatch

    batch = ImageBatch(np.arange(4), torch.view_as_complex((y + noise).contiguous()), ctf, rot)
    d = obj.inputs(batch)
    assert "enc" not in d  # formed on the device from y, not prepared and copied beside it
    with torch.no_grad():
        mu, logvar = obj.encode(d)
        mu0, logvar0 = obj.encoder((noise * torch.sign(ctf)[..., None]).reshape(4, -1))
        empty = obj.encode({**d, "y": y})[0]
    torch.testing.assert_close(mu, mu0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logvar, logvar0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(empty, obj.encoder(torch.zeros(4, 2 * len(points)))[0].detach(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="anchor"):
        AmortisedInference(VolumeConfig(box=BOX, apix=4.0, dec_dim=32), points, settings)
    run_method(TRAIN_VAE, dict(particles=str(low_snr / "particles.star"), epochs=1, enc_dim=16, dec_dim=16,
                               batch_size=64, threads=1), tmp_path / "res")  # auto: residual when anchored
    assert json.loads((tmp_path / "res" / "config.json").read_text())["inference"]["encoder_input"] == "residual"
    assert np.isfinite(np.load(tmp_path / "res" / "z.npy")).all()
    run_method(TRAIN_VAE, dict(particles=str(low_snr / "particles.star"), epochs=1, enc_dim=16, dec_dim=16,
                               batch_size=64, anchor="none", threads=1), tmp_path / "img")
    assert "encoder_input" not in json.loads((tmp_path / "img" / "config.json").read_text())["inference"]
