"""The pose-aware encoder (``train-vae --encoder_filters``): each filter map is sliced at the image's pose, made
Hermitian, CTF-weighted and correlated with the image's signal; computed here by direct indexing of the filter
grid at poses that are quarter turns (where every slice point is a grid point), and trained end to end."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vae import hinge  # noqa: F401  (test_vae's hinge: 1000 particles, box 32, SNR 1)

from cryohet.data.prepare import ImageBatch
from cryohet.geometry.lattice import Lattice
from cryohet.inference.amortised import FILTER_LR_FACTOR, AmortisedInference
from cryohet.inference.elbo import gaussian_elbo
from cryohet.inference.memory_plans import VaeShape
from cryohet.inference.pose_filters import PoseFilterBank, filter_shape
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.neural import VolumeConfig
from cryohet.runner import run_method
from cryohet.validation.metrics import spearman_pc1

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
BOX = 16


def _quarter_turns() -> np.ndarray:
    """The 24 rotations of the cube (signed permutation matrices of determinant 1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.isclose(np.linalg.det(m), 1):
                out.append(m)
    return np.array(out)


def test_responses_are_the_ctf_weighted_correlations_with_the_hermitian_filters_slices() -> None:
    points = Lattice(BOX, 3.0).half_plane()
    freq = 0.25
    bank = PoseFilterBank(3, BOX, points.kxy, points.weight, freq, torch.Generator().manual_seed(0))
    g = bank.grid
    assert (bank.n_voxels, len(bank.sel)) == filter_shape(BOX, points.kxy, freq)
    assert len(bank.sel) == int((points.kxy.norm(dim=-1) <= freq + 1e-9).sum())
    rots = _quarter_turns()
    rot = torch.as_tensor(rots, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    ctf = torch.rand(len(rots), len(points), generator=gen) * 2 - 1
    signal = torch.randn(len(rots), len(points), 2, generator=gen)
    with torch.no_grad():
        got = bank(rot, ctf, signal).numpy()
    # by hand: the filter grid as complex arrays (voxels that cannot be read hold zeros), its Hermitian part
    # H(i) = (F(i) + conj F(mirror i)) / 2
    vals = bank.values.detach().numpy()
    full = np.zeros((2, g ** 3, 3))
    near = bank.compact.numpy() >= 0
    full[0, near], full[1, near] = vals[:bank.n_voxels], vals[bank.n_voxels:]
    fc = (full[0] + 1j * full[1]).T.reshape(3, g, g, g)  # (K, z, y, x)
    herm = 0.5 * (fc + np.conj(fc[:, ::-1, ::-1, ::-1]))
    inside = (points.kxy.norm(dim=-1) <= freq + 1e-9).numpy()
    k = np.round(points.kxy.numpy()[inside] * BOX).astype(int)  # integer pixels (kx, ky)
    w = points.weight.numpy()[inside]
    w = w / np.sqrt(w.sum())
    sig = signal.numpy()[:, inside, 0] + 1j * signal.numpy()[:, inside, 1]
    want = np.zeros_like(got)
    for b, a in enumerate(rots):
        pos = np.rint(k @ a[:2, :]).astype(int) + g // 2  # (x, y, z) grid indices of Aᵀ (kx, ky, 0)
        vals = herm[:, pos[:, 2], pos[:, 1], pos[:, 0]]  # (K, M')
        want[b] = (w * ctf.numpy()[b, inside] * np.real(np.conj(vals) * sig[b])).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _maps_learn_at_their_rate(obj: AmortisedInference, d: dict[str, torch.Tensor], values: torch.Tensor) -> None:
    """The learnt filter maps ``values`` are the objective's second parameter group, at ``FILTER_LR_FACTOR`` times
    the networks' rate, and one step's loss on ``d`` has a gradient for them."""
    groups = obj.param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-4 * FILTER_LR_FACTOR)]
    assert groups[1]["params"] == [values]
    gen, kld = obj(d, torch.randn(len(d["rot"]), obj.noise_dim, generator=torch.Generator().manual_seed(6)))
    (gen + kld).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0

def test_the_filters_encoder_reads_the_residual_trains_and_is_planned() -> None:
    """With ``encoder_filters`` the loader prepares no encoder image, the encoder's input is the K responses to
    the residual (an image that is exactly the base's projection responds with zeros), the filters get their own
    learning rate, a step's gradient reaches them, and the memory plan counts their grid."""
    cfg = VolumeConfig(box=BOX, apix=3.0, dec_dim=16, seed=2, data_scale=1.0, anchor=True)
    points = Lattice(BOX, 3.0).half_plane()
    settings = {"enc_layers": 2, "enc_dim": 16, "encoder_input": "residual", "encoder_filters": 4,
                "filter_freq": 0.25}
    obj = AmortisedInference(cfg, points, settings)
    obj.decoder.set_base(torch.randn((BOX,) * 3, generator=torch.Generator().manual_seed(3)))
    assert obj.settings["encoder_filters"] == 4 and obj.encoder.mlp.first.in_features == 4
    rot = torch.as_tensor(_quarter_turns()[:6], dtype=torch.float32)
    ctf = torch.rand(6, len(points), generator=torch.Generator().manual_seed(4)) + 0.1
    y = obj.decoder.base_slices(rot, points.kxy) * ctf[..., None]
    batch = ImageBatch(np.arange(6), torch.view_as_complex(y.contiguous()), ctf, rot)
    d = obj.inputs(batch)
    assert "enc" not in d
    with torch.no_grad():
        torch.testing.assert_close(obj.filters(rot, ctf, d["y"] - y), torch.zeros(6, 4))
    d["y"] = d["y"] + torch.randn(d["y"].shape, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(6, cfg.zdim, generator=torch.Generator().manual_seed(7))
    for active in (None, torch.arange(len(points)) % 3 > 0):  # the base's slices, computed once, serve both
        obj.active = active
        a = slice(None) if active is None else active
        with torch.no_grad():
            torch.testing.assert_close(obj(d, eps), gaussian_elbo(obj.decoder, points.kxy[a], rot, d["y"][:, a],
                                                                  ctf[:, a], *obj.encode(d), eps))
    _maps_learn_at_their_rate(obj, d, obj.filters.values)
    plain = VaeShape(len(points), 6 * 8, 16, 3, cfg.zdim, 16, 2)
    with_bank = VaeShape(len(points), 6 * 8, 16, 3, cfg.zdim, 16, 2, n_filters=4,
                         filter_voxels=obj.filters.n_voxels, filter_points=len(obj.filters.sel))
    n_model = sum(p.numel() for p in obj.parameters())
    assert with_bank.n_params() - plain.n_params() == n_model - sum(
        p.numel() for p in AmortisedInference(cfg, points, {"enc_layers": 2, "enc_dim": 16}).parameters())
    fixed = dataclasses.replace(with_bank, fixed_filters=True)  # --filters_from: stored, but no gradient or moments
    assert with_bank.n_params() - fixed.n_params() == obj.filters.values.numel()
    assert with_bank.fixed_bytes() - fixed.fixed_bytes() == 3 * 4 * obj.filters.values.numel()


def test_a_learnt_bank_beside_fixed_filters_starts_at_zero_trains_and_is_planned() -> None:
    """``learnt_filters`` beside fixed filters: the encoder reads both banks' responses, the learnt bank's are
    zero at the start (the encoder begins as the fixed filters' alone), a step's gradient reaches the learnt maps
    but not the fixed ones, both banks' maps get the filters' learning rate, and the memory plan counts the second
    bank's maps, their Adam moments and each image's spread signal."""
    cfg = VolumeConfig(box=BOX, apix=3.0, dec_dim=16, seed=2, data_scale=1.0, anchor=True)
    points = Lattice(BOX, 3.0).half_plane()
    fixed = {"enc_layers": 2, "enc_dim": 16, "encoder_input": "residual", "encoder_filters": 3,
             "filter_freq": 0.2, "filters_from": "covariance"}
    with pytest.raises(ValueError, match="need the covariance filters"):
        AmortisedInference(cfg, points, {**fixed, "filters_from": "", "learnt_filters": 4,
                                         "learnt_filter_freq": 0.25})
    obj = AmortisedInference(cfg, points, {**fixed, "learnt_filters": 4, "learnt_filter_freq": 0.25})
    obj.decoder.set_base(torch.randn((BOX,) * 3, generator=torch.Generator().manual_seed(3)))
    assert obj.encoder.mlp.first.in_features == 7 and obj.settings["learnt_filters"] == 4
    assert float(obj.learnt.values.detach().abs().max()) == 0.0 and not list(obj.filters.parameters())
    rot = torch.as_tensor(_quarter_turns()[:6], dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    ctf = torch.rand(6, len(points), generator=gen) + 0.1
    d = {"y": torch.randn(6, len(points), 2, generator=gen), "ctf": ctf, "rot": rot}
    zero = obj.encoder.mlp.first.weight.detach().clone()
    with torch.no_grad():
        obj.encoder.mlp.first.weight[:, 3:] = 0  # the learnt bank's inputs cut: the same codes, as they are zero
        cut = obj.encode(d)
        obj.encoder.mlp.first.weight.copy_(zero)
        torch.testing.assert_close(obj.encode(d), cut)
    _maps_learn_at_their_rate(obj, d, obj.learnt.values)
    shape = VaeShape(len(points), 6 * 8, 16, 3, cfg.zdim, 16, 2, n_filters=3, filter_voxels=obj.filters.n_voxels,
                     filter_points=len(obj.filters.sel), fixed_filters=True)
    both = dataclasses.replace(shape, learnt_filters=4, learnt_voxels=obj.learnt.n_voxels,
                               learnt_points=len(obj.learnt.sel))
    assert (obj.learnt.n_voxels, len(obj.learnt.sel)) == filter_shape(BOX, points.kxy, 0.25)
    n_model = sum(p.numel() for p in obj.parameters())
    alone = AmortisedInference(cfg, points, fixed)
    assert both.n_params() - shape.n_params() == n_model - sum(p.numel() for p in alone.parameters())
    assert both.image_bytes() - shape.image_bytes() == 4 * (2 * obj.learnt.n_voxels + 96 * len(obj.learnt.sel))

def test_the_pose_aware_encoder_learns_the_hinge_better_than_the_pixel_encoder(hinge: Path,  # noqa: F811
                                                                              tmp_path: Path) -> None:
    """32 learnt filter maps at 20 Å on the residual against ``--encoder_filters 0`` (the residual's pixels),
    on the same hinge and settings as test_vae_anchor's check: |Spearman| of the latents' first principal
    component with the hinge angle (measured 0.913 against 0.730)."""
    rho = {}
    for name, extra in (("filters", {"filters_from": "learnt"}), ("pixels", {"encoder_filters": 0})):
        run_method(TRAIN_VAE, dict(particles=str(hinge / "particles.star"), epochs=5, enc_dim=128, dec_dim=128,
                                   batch_size=32, lr=1e-3, threads=1, **extra), tmp_path / name)
        rho[name] = spearman_pc1(np.load(tmp_path / name / "z.npy"), np.load(hinge / "ground_truth.npz")["tau"])
    inference = json.loads((tmp_path / "filters" / "config.json").read_text())["inference"]
    assert inference["encoder_filters"] == 32 and inference["filter_freq"] == pytest.approx(4.0 / 20.0)
    assert "encoder_filters" not in json.loads((tmp_path / "pixels" / "config.json").read_text())["inference"]
    print(f"hinge |Spearman| PC1: filters {rho['filters']:.3f}, pixels {rho['pixels']:.3f}")
    assert rho["filters"] > 0.85 and rho["filters"] > rho["pixels"] + 0.1, rho


def test_filters_set_from_maps_are_their_transforms_at_unit_rms() -> None:
    """``set_maps``: filter k at grid voxel d (from the centre) is the centred transform of map k at frequency d,
    over the readable voxels, scaled to unit RMS; fixed filters are a buffer saved with the model, not learnt."""
    points = Lattice(BOX, 3.0).half_plane()
    bank = PoseFilterBank(2, BOX, points.kxy, points.weight, 0.25, torch.Generator().manual_seed(0), fixed=True)
    assert not list(bank.parameters()) and "values" in bank.state_dict()
    maps = np.random.default_rng(3).normal(size=(2, BOX, BOX, BOX)).astype(np.float32)
    bank.set_maps(maps)
    g, c = bank.grid, BOX // 2
    near = bank.compact.numpy() >= 0
    zz, yy, xx = np.unravel_index(np.flatnonzero(near), (g,) * 3)
    for k in range(2):
        ft = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(maps[k].astype(np.float64))))
        want = ft[zz - g // 2 + c, yy - g // 2 + c, xx - g // 2 + c]
        want = want / np.sqrt(np.mean(np.abs(want) ** 2))
        got = bank.values[:bank.n_voxels, k].numpy() + 1j * bank.values[bank.n_voxels:, k].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2 cubic maps"):
        bank.set_maps(maps[:1])


def test_train_vae_takes_its_filters_from_a_principal_volumes_run(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """``--filters_from`` a principal-volumes run of the same particles: as many fixed filters as it has principal
    volumes, recorded in the run, unchanged by training and kept in the model file; resuming takes them from the
    checkpoint, so the run may have moved since; a run of another box, and the auto-decoder (no encoder), are
    refused."""
    from safetensors.torch import load_file

    from cryohet.errors import InputError
    from cryohet.methods.principal_volumes import METHOD as PRINCIPAL_VOLUMES
    from cryohet.methods.simulate import METHOD as SIMULATE
    from cryohet.models.linear import LinearModel

    star = str(hinge / "particles.star")
    run_method(PRINCIPAL_VOLUMES, dict(particles=star, n_components=2, resolution_A=16.0, max_iter=3,
                                       threads=1), tmp_path / "pv")
    run_method(TRAIN_VAE, dict(particles=star, epochs=2, enc_dim=32, dec_dim=32, batch_size=64, threads=1,
                               filters_from=str(tmp_path / "pv")), tmp_path / "vae")
    inference = json.loads((tmp_path / "vae" / "config.json").read_text())["inference"]
    assert inference["encoder_filters"] == 2 and inference["filters_from"] == str((tmp_path / "pv").resolve())
    values = load_file(str(tmp_path / "vae" / "model.safetensors"))["filters.values"]
    bank = PoseFilterBank(2, 32, Lattice(32, 4.0).half_plane().kxy, Lattice(32, 4.0).half_plane().weight,
                          inference["filter_freq"], torch.Generator(), fixed=True)
    bank.set_maps(LinearModel.load(next((tmp_path / "pv").glob("*.npz"))).components)
    torch.testing.assert_close(values, bank.values)
    z = np.load(tmp_path / "vae" / "z.npy")
    assert z.shape == (1000, 8) and np.isfinite(z).all()
    run_method(SIMULATE, dict(box=24, apix=4.0, resolution_A=10.0, n_particles=50, snr=1.0, n_states=2, threads=1,
                              seed=1), tmp_path / "small")  # 96 Å across, the run's maps 128 Å
    with pytest.raises(InputError, match=r"span 128\.0 Å .* particles' box spans 96\.0 Å"):
        run_method(TRAIN_VAE, dict(particles=str(tmp_path / "small" / "particles.star"), epochs=1, enc_dim=16,
                                   dec_dim=16, threads=1, filters_from=str(tmp_path / "pv")), tmp_path / "bad")
    with pytest.raises(ValueError, match="auto-decoder .* has no encoder"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=1, inference="autodecoder", threads=1,
                                   filters_from=str(tmp_path / "pv")), tmp_path / "bad_ad")
    (tmp_path / "pv").rename(tmp_path / "pv_moved")
    run_method(TRAIN_VAE, dict(particles=star, epochs=3, enc_dim=32, dec_dim=32, batch_size=64, threads=1,
                               filters_from=str(tmp_path / "pv"), resume=True), tmp_path / "vae")
    history = json.loads((tmp_path / "vae" / "config.json").read_text())["history"]
    assert len(history) == 3
    torch.testing.assert_close(load_file(str(tmp_path / "vae" / "model.safetensors"))["filters.values"], values)
