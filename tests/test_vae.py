"""train-vae: learning a conformational latent, model files and volumes, resume after kills at several points
(also while a checkpoint is written), damaged checkpoints, a full disk, NaN guard, refusal of a model of another
box, and two DDP ranks (gloo, CPU) against one."""
from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from ddp_tools import train_vae_on_two_ranks
from faults import file_size_limit, kill_when, run_until_killed, self_kill, start, temporaries

from cryohet.errors import InputError, OutputError
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.inference.trainer import CHECKPOINT_NAME, TrainingDiverged, load_checkpoint
from cryohet.io.weights import previous_path
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.base import load_volume_model
from cryohet.models.neural import NeuralVolume, VolumeConfig, load_volume, read_model, save_model
from cryohet.runner import run_method
from cryohet.validation.metrics import spearman_pc1

#: small and quick: the tests look at behaviour, bench/bench_vae.py at accuracy and speed
TINY = dict(enc_dim=64, dec_dim=64, batch_size=32, lr=1e-3, threads=1)
#: smaller still, on 300 particles, for the runs that are killed, damaged or starved of disk space
FAST = dict(enc_dim=32, dec_dim=32, batch_size=32, lr=1e-3, threads=1, epochs=8)


@pytest.fixture(scope="module")
def hinge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 particles of the bundled molecule's hinge motion, box 32, SNR 1."""
    out = tmp_path_factory.mktemp("hinge")
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=1000, snr=1.0, n_states=20,
                              threads=1, seed=3), out)
    return out


@pytest.fixture(scope="module")
def trained(hinge: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run_method(TRAIN_VAE, dict(particles=str(hinge / "particles.star"), epochs=5, enc_dim=128, dec_dim=128,
                               batch_size=32, lr=1e-3, threads=1), out)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model file (the volume's and the inference's)."""
    return read_model(path)[2]


def test_vae_learns_the_conformation_and_writes_its_outputs(hinge: Path, trained: Path) -> None:
    record = json.loads((trained / "cryohet_run.json").read_text())
    assert record["status"] == "finished"
    kinds = {o["kind"]: o for o in record["outputs"]}
    assert set(kinds) == {"model", "latents", "particles_star", "plot"}
    assert kinds["model"]["meta"]["model_type"] == "vae"
    z = np.load(trained / "z.npy")
    logvar = np.load(trained / kinds["latents"]["meta"]["logvar"])
    assert z.shape == logvar.shape == (1000, 8) and np.isfinite(z).all() and np.isfinite(logvar).all()
    star = starfile.read(trained / "particles.star")["particles"]
    np.testing.assert_allclose(star[[f"cryohetZ{i}" for i in range(1, 9)]].to_numpy(), z, rtol=1e-5, atol=1e-6)
    history = json.loads((trained / "config.json").read_text())["history"]
    assert history[-1]["gen_loss"] < history[0]["gen_loss"]
    # the latent follows the true hinge angle: chance is |rho| ~ 0.03 for 1000 particles
    tau = np.load(hinge / "ground_truth.npz")["tau"]
    rho = spearman_pc1(z, tau)
    print(f"|Spearman| of the latent's first PC with the true hinge angle: {rho:.3f}")
    assert rho > 0.35, rho
    # the model is a VolumeModel for analysis and validation
    vm = load_volume_model(trained)
    vols = vm.volumes(z[:2])
    assert vols.shape == (2, 32, 32, 32) and vols.dtype == np.float32 and np.isfinite(vols).all()
    assert (vm.box, vm.latent_dim) == (32, 8)


def test_goodness_of_fit_under_mixed_precision_matches_float32(trained: Path) -> None:
    """The run's cryohetFitZ / cryohetResidualZ (scored under the trainer's mixed precision, the noise sample kept
    and not scored twice) are the float32 scores within 0.04 noise s.d. (RMS; at most 0.1), at any batch size."""
    from cryohet.io.particles import load_particles
    from cryohet.validation.goodness import latent_predictors, score_particles

    star = starfile.read(trained / "particles.star")["particles"]
    decoder = load_volume(trained / "model.safetensors").eval()
    predictors = latent_predictors(decoder, np.load(trained / "z.npy"))
    pset = load_particles(trained / "particles.star")
    exact = score_particles(pset, *predictors, batch_size=50, n_sample=300, amp="no")
    again = score_particles(pset, *predictors, batch_size=64, n_sample=300, amp="no")
    np.testing.assert_allclose(exact.fit_z, again.fit_z, atol=1e-6)  # nor do the batches
    whole = score_particles(pset, *predictors, batch_size=64, amp="no")  # the default sample: every particle
    diff = star["cryohetFitZ"].to_numpy() - whole.fit_z
    print(f"cryohetFitZ, mixed precision - float32: RMS {np.sqrt(np.mean(diff**2)):.4f}, max {np.abs(diff).max():.4f}")
    assert np.sqrt(np.mean(diff**2)) < 0.04 and np.abs(diff).max() < 0.1
    np.testing.assert_allclose(star["cryohetResidualZ"], whole.residual_z, atol=0.02)
    assert 0.7 < np.std(whole.fit_z) < 2.0 and abs(np.median(whole.fit_z)) < 0.2


@pytest.mark.parametrize("domain,pe_type", [("fourier", "gaussian"), ("hartley", "geom")])
def test_decoder_slices_are_the_projections_of_its_volumes(tmp_path: Path, domain: str, pe_type: str) -> None:
    """Conventions: the model's image of pose A is the Fourier slice Aᵀ(kx, ky, 0) of the map it returns."""
    model = NeuralVolume(VolumeConfig(box=32, apix=4.0, dec_dim=32, seed=5, data_scale=3.0, domain=domain,
                                      pe_type=pe_type)).eval()
    path = save_model(tmp_path / "m.safetensors", model, {"kind": "none"},
                      {f"decoder.{k}": v for k, v in model.state_dict().items()})
    again = load_volume(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    vol = model.volumes(z.numpy())[0]
    A = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(1))), dtype=torch.float32)
    points = Lattice(32, 4.0).half_plane()
    with torch.no_grad():
        pred = model.slices(A, z.expand(4, 8), points.kxy) * 3.0
    pred = torch.complex(pred[..., 0], pred[..., 1])
    ref = points.take(Projector(torch.from_numpy(vol)).slice(A))
    low = points.kxy.norm(dim=1) < 0.3
    for b in range(4):
        a, r = pred[b, low], ref[b, low]
        corr = (a * r.conj()).sum().real / (a.abs().norm() * r.abs().norm())
        assert corr > 0.95, (b, float(corr))
    if pe_type != "gaussian":
        return  # the geometric encoding's random maps are too smooth for the next check to tell poses apart
    # the transposed pose is a different slice: the check can fail
    wrong = points.take(Projector(torch.from_numpy(vol)).slice(A.transpose(1, 2)))
    a, r = pred[0, low], wrong[0, low]
    assert (a * r.conj()).sum().real / (a.abs().norm() * r.abs().norm()) < 0.8


def _train_code(particles: Path, out: Path, **values: object) -> str:
    vals = dict(particles=str(particles), **{**TINY, **values})
    return ("from cryohet.runner import run_method\nfrom cryohet.methods.train_vae import METHOD\n"
            f"run_method(METHOD, {vals!r}, {str(out)!r})\n")


@pytest.fixture(scope="module")
def small(hinge: Path) -> Path:
    """The first 300 particles of ``hinge`` (a STAR beside its stack): quick runs for the fault tests."""
    tables = starfile.read(hinge / "particles.star", always_dict=True)
    tables["particles"] = tables["particles"].iloc[:300]
    starfile.write(tables, hinge / "particles_300.star")
    return hinge / "particles_300.star"


@pytest.fixture(scope="module")
def uninterrupted(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder of an uninterrupted ``FAST`` run on ``small`` with a given inference (run once, when first asked)."""
    runs: dict[str, Path] = {}

    def run(inference: str) -> Path:
        if inference not in runs:
            runs[inference] = tmp_path_factory.mktemp(f"uninterrupted_{inference}")
            run_method(TRAIN_VAE, dict(particles=str(small), inference=inference, **FAST), runs[inference])
        return runs[inference]
    return run


def _checkpoint_epoch(folder: Path) -> int:
    """Epoch of the checkpoint under the newest name in ``folder`` (0 while there is none)."""
    try:
        return load_checkpoint(folder / CHECKPOINT_NAME).epoch
    except InputError:
        return 0


def _assert_same_run(ref: Path, out: Path) -> None:
    """Bit for bit the same weights, latents and losses per epoch."""
    a, b = _weights(ref / "model.safetensors"), _weights(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    np.testing.assert_array_equal(np.load(ref / "z.npy"), np.load(out / "z.npy"))
    h_ref, h_out = (json.loads((d / "config.json").read_text())["history"] for d in (ref, out))
    assert [h["epoch"] for h in h_out] == list(range(1, FAST["epochs"] + 1))
    assert [h["loss"] for h in h_out] == [h["loss"] for h in h_ref]


@pytest.mark.parametrize("inference", ["amortised", "autodecoder"])
def test_runs_killed_at_several_points_resume_to_the_same_model(small: Path, uninterrupted: Callable[[str], Path],
                                                                tmp_path: Path, inference: str) -> None:
    """Killed while writing the checkpoint of epoch 2, between the two renames of that of epoch 4 and at a
    random moment after that of epoch 5 or 6, each time continued with --resume yes: the run ends bit for bit
    as an uninterrupted one."""
    out = tmp_path / "killed"
    values = dict(particles=str(small), inference=inference, resume=True, **FAST)  # no checkpoint yet: from scratch
    code = _train_code(small, out, inference=inference, resume=True, **FAST)
    run_until_killed(self_kill(mid_write=2) + code)
    assert _checkpoint_epoch(out) == 1
    assert any(p.name.startswith(f".{CHECKPOINT_NAME}.") for p in temporaries(out))  # the half-written one
    run_until_killed(self_kill(between_renames=4) + code)
    assert not (out / CHECKPOINT_NAME).exists()
    assert load_checkpoint(previous_path(out / CHECKPOINT_NAME)).epoch == 3
    rng = random.Random(inference)
    epoch, delay = rng.choice([5, 6]), rng.uniform(0.0, 0.3)
    kill_when(start(code), lambda: _checkpoint_epoch(out) >= epoch, delay)
    assert not (out / "model.safetensors").exists() or _checkpoint_epoch(out) == FAST["epochs"]
    run_method(TRAIN_VAE, values, out)
    _assert_same_run(uninterrupted(inference), out)
    log = (out / "run.log").read_text()
    assert "continuing from the previous checkpoint" in log and "the run stopped while replacing it" in log
    assert not temporaries(out)


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(small: Path, uninterrupted: Callable[[str], Path],
                                                                    tmp_path: Path) -> None:
    """The newest checkpoint truncated, or overwritten with garbage, after 2 epochs: resuming warns, continues from
    epoch 1 and ends as the uninterrupted run; with both checkpoints damaged the error names both."""
    first = tmp_path / "first"
    run_method(TRAIN_VAE, dict(particles=str(small), **{**FAST, "epochs": 2}), first)
    assert load_checkpoint(previous_path(first / CHECKPOINT_NAME)).epoch == 1
    data = (first / CHECKPOINT_NAME).read_bytes()
    damages = {"truncated": data[: len(data) // 2], "garbage": np.random.default_rng(0).bytes(len(data))}
    for name, damaged in damages.items():
        out = tmp_path / name
        shutil.copytree(first, out)
        (out / CHECKPOINT_NAME).write_bytes(damaged)
        run_method(TRAIN_VAE, dict(particles=str(small), resume=True, **FAST), out)
        log = (out / "run.log").read_text()
        assert f"WARNING checkpoint {out / CHECKPOINT_NAME} is unusable: not a complete safetensors file" in log
        assert f"resuming from {previous_path(out / CHECKPOINT_NAME)} after epoch 1" in log
        assert (out / "checkpoint.unusable.safetensors").read_bytes() == damaged  # kept aside, out of the way
        _assert_same_run(uninterrupted("amortised"), out)
    out = tmp_path / "garbage"
    for path in (out / CHECKPOINT_NAME, previous_path(out / CHECKPOINT_NAME)):
        path.write_bytes(damages["truncated"])
    with pytest.raises(InputError, match=r"no usable checkpoint \(.*checkpoint\.safetensors: not a complete.*"
                                         r"checkpoint\.prev\.safetensors: not a complete"):
        run_method(TRAIN_VAE, dict(particles=str(small), resume=True, **{**FAST, "epochs": 9}), out)


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_good_one(small: Path, tmp_path: Path) -> None:
    """Writing the checkpoint of epoch 2 fails (a file-size limit): a clear error naming it, the run fails, the
    checkpoint of epoch 1 is intact and no temporary file is left; the run then resumes from it."""
    run_method(TRAIN_VAE, dict(particles=str(small), **{**FAST, "epochs": 1}), tmp_path)
    ckpt = tmp_path / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    with file_size_limit(len(good) // 2), pytest.raises(OutputError, match=f"{ckpt}: could not be written: file "
                                                                           "too large"):
        run_method(TRAIN_VAE, dict(particles=str(small), resume=True, **{**FAST, "epochs": 2}), tmp_path)
    assert ckpt.read_bytes() == good and not previous_path(ckpt).exists() and not temporaries(tmp_path)
    record = json.loads((tmp_path / "cryohet_run.json").read_text())
    assert record["status"] == "failed" and "could not be written" in record["error"]
    run_method(TRAIN_VAE, dict(particles=str(small), resume=True, **{**FAST, "epochs": 2}), tmp_path)
    assert load_checkpoint(ckpt).epoch == 2 and load_checkpoint(previous_path(ckpt)).epoch == 1


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(hinge: Path, tmp_path: Path) -> None:
    star = hinge / "particles.star"
    run_method(TRAIN_VAE, dict(particles=str(star), epochs=1, **TINY), tmp_path)
    ckpt = tmp_path / CHECKPOINT_NAME
    good = ckpt.read_bytes()
    # an absurd learning rate on resuming makes the weights overflow in epoch 2
    with pytest.raises(TrainingDiverged, match=r"loss became .* at epoch 2.*last good checkpoint \(epoch 1\)"):
        run_method(TRAIN_VAE, dict(particles=str(star), epochs=3, resume=True, **{**TINY, "lr": 1e30}), tmp_path)
    assert ckpt.read_bytes() == good
    record = json.loads((tmp_path / "cryohet_run.json").read_text())
    assert record["status"] == "failed" and "loss became" in record["error"]


def test_nan_pixels_are_refused_by_name(hinge: Path, tmp_path: Path) -> None:
    import mrcfile

    stack = tmp_path / "particles.mrcs"
    with mrcfile.open(hinge / "particles.mrcs") as m:
        data = m.data.copy()
    data[7, 3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaN we put there
        with mrcfile.new(stack) as m:
            m.set_data(data)
    tables = starfile.read(hinge / "particles.star", always_dict=True)
    starfile.write(tables, tmp_path / "particles.star")
    with pytest.raises(InputError, match=r"particle 7\) holds NaN"):
        run_method(TRAIN_VAE, dict(particles=str(tmp_path / "particles.star"), epochs=1, **TINY), tmp_path / "o")


def test_a_model_of_another_box_is_refused(hinge: Path, trained: Path, tmp_path: Path) -> None:
    star = str(hinge / "particles.star")
    with pytest.raises(InputError, match="box of 32 px .* 16 px"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=1, crop_box=16, init_model=str(trained),
                                   **{**TINY, "enc_dim": 128, "dec_dim": 128}), tmp_path / "init")
    run_method(TRAIN_VAE, dict(particles=star, epochs=1, **TINY), tmp_path / "run")
    with pytest.raises(InputError, match="box of 32 px .* 16 px"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=2, crop_box=16, resume=True, **TINY), tmp_path / "run")
    with pytest.raises(InputError, match="architecture"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=2, resume=True, **{**TINY, "dec_dim": 32}),
                   tmp_path / "run")


def test_two_ddp_ranks_give_the_one_rank_result(hinge: Path, tmp_path: Path) -> None:
    star = hinge / "particles.star"
    # gloo ranks on the CPU, also where GPUs are visible; the unanchored decoder at β 1/zdim, whose latents are
    # well determined after 2 epochs (the default's, near the prior there, move by more than the tolerance below
    # for the ranks' weight differences of 1e-3)
    common = dict(epochs=2, amp="no", device="cpu", anchor="none", beta=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    run_method(TRAIN_VAE, dict(particles=str(star), **TINY, **common), one)
    res = train_vae_on_two_ranks(dict(particles=str(star), **{**TINY, **common}), two)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 rank(s)" in (two / "run.log").read_text()
    h1 = json.loads((one / "config.json").read_text())["history"]
    h2 = json.loads((two / "config.json").read_text())["history"]
    assert h1[0]["gen_loss"] == pytest.approx(h2[0]["gen_loss"], rel=1e-5)
    assert h1[1]["gen_loss"] == pytest.approx(h2[1]["gen_loss"], rel=1e-3)
    a, b = _weights(one / "model.safetensors"), _weights(two / "model.safetensors")
    scale = max(float(v.abs().max()) for v in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2 * scale
    z1, z2 = np.load(one / "z.npy"), np.load(two / "z.npy")
    assert np.abs(z1 - z2).max() < 0.05 * np.abs(z1).max()
    rec = json.loads((two / "cryohet_run.json").read_text())
    assert rec["status"] == "finished" and {o["kind"] for o in rec["outputs"]} >= {"model", "latents"}
    pd.testing.assert_frame_equal(starfile.read(one / "particles.star")["particles"].iloc[:, :10],
                                  starfile.read(two / "particles.star")["particles"].iloc[:, :10])


def test_hartley_domain_with_cropping_and_a_resolution_limit(hinge: Path, tmp_path: Path) -> None:
    run_method(TRAIN_VAE, dict(particles=str(hinge / "particles.star"), epochs=1, domain="hartley", pe_type="geom",
                               crop_box=24, res_limit_A=12.0, zdim=2, **TINY), tmp_path)
    model = load_volume(tmp_path / "model.safetensors")
    assert (model.cfg.box, model.cfg.apix, model.cfg.domain) == (24, pytest.approx(4.0 * 32 / 24), "hartley")
    assert model.cfg.max_freq == pytest.approx(model.cfg.apix / 12.0)
    assert np.load(tmp_path / "z.npy").shape == (1000, 2)
    vol = load_volume_model(tmp_path).volumes(np.zeros((1, 2)))
    assert vol.shape == (1, 24, 24, 24) and np.isfinite(vol).all()
    # the goodness of fit is scored inside the fitted circle only (the model is not fitted beyond it)
    from cryohet.io.particles import load_particles
    from cryohet.validation.goodness import latent_predictors, score_particles

    star = starfile.read(tmp_path / "particles.star")["particles"]
    pset, preds = load_particles(tmp_path / "particles.star"), latent_predictors(model, np.load(tmp_path / "z.npy"))
    fit = {f: score_particles(pset, *preds, box=24, batch_size=32, amp="auto", max_freq=f).fit_z
           for f in (model.cfg.max_freq, 0.5)}
    np.testing.assert_allclose(star["cryohetFitZ"], fit[model.cfg.max_freq], atol=1e-5)
    assert np.abs(star["cryohetFitZ"] - fit[0.5]).max() > 0.1


def test_the_autodecoder_trains_the_same_decoder_through_the_same_trainer(hinge: Path, tmp_path: Path) -> None:
    """A second inference strategy: a free q(z) per particle, no encoder; it learns the hinge and resumes exactly."""
    star = str(hinge / "particles.star")
    common = dict(particles=star, inference="autodecoder", **{**TINY, "enc_dim": 128, "dec_dim": 128})
    full = tmp_path / "full"
    run_method(TRAIN_VAE, dict(epochs=5, **common), full)
    tensors = _weights(full / "model.safetensors")
    assert {k.split(".")[0] for k in tensors} == {"decoder", "table"}   # no encoder
    assert tensors["table.mu"].shape == (1000, 8)
    z = np.load(full / "z.npy")
    np.testing.assert_array_equal(z, tensors["table.mu"].numpy())
    rho = spearman_pc1(z, np.load(hinge / "ground_truth.npz")["tau"])
    print(f"auto-decoder: |Spearman| of the latent's first PC with the true hinge angle: {rho:.3f}")
    assert rho > 0.35, rho
    vols = load_volume_model(full).volumes(z[:2])      # the same VolumeModel as the VAE's
    assert vols.shape == (2, 32, 32, 32) and np.isfinite(vols).all()
    # 2 + 3 epochs with a resume end exactly as 5 epochs
    part = tmp_path / "part"
    run_method(TRAIN_VAE, dict(epochs=2, **common), part)
    run_method(TRAIN_VAE, dict(epochs=5, resume=True, **common), part)
    a, b = _weights(full / "model.safetensors"), _weights(part / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(InputError, match="inference differs"):
        run_method(TRAIN_VAE, dict(particles=star, epochs=6, resume=True, **{**TINY, "enc_dim": 128, "dec_dim": 128}),
                   part)
