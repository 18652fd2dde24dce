"""The trainer's step guard reads the device only every few steps (#17 item 1): a non-finite loss in the last
step of an epoch is still caught, named and never checkpointed, and each epoch's logged losses are the mean of its
steps' losses (recomputed here, step by step, with frozen weights)."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryohet.data.loader import Batch, BatchStream, epoch_order, shard_batches
from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.lattice import Lattice
from cryohet.inference.fit_neural import fit_neural
from cryohet.inference.trainer import CHECK_EVERY, CHECKPOINT_NAME, TrainingDiverged, TrainOptions, _noise
from cryohet.io.particles import load_particles
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.neural import VolumeConfig
from cryohet.runner import run_method

N, BATCH = 600, 32
SMALL = dict(enc_dim=32, dec_dim=32, batch_size=BATCH, lr=1e-3, threads=1)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 particles of the bundled molecule's hinge motion, box 32, SNR 1."""
    out = tmp_path_factory.mktemp("guard")
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=N, snr=1.0, n_states=10, threads=1,
                              seed=5), out)
    return out


def test_a_bad_last_step_is_caught_at_the_epochs_end_and_never_checkpointed(sim: Path, tmp_path: Path) -> None:
    star = tmp_path / "particles.star"
    star.write_text((sim / "particles.star").read_text())
    stack = tmp_path / "particles.mrcs"
    stack.write_bytes((sim / "particles.mrcs").read_bytes())
    out = tmp_path / "run"
    run_method(TRAIN_VAE, dict(particles=str(star), epochs=1, **SMALL), out)
    good = (out / CHECKPOINT_NAME).read_bytes()
    reader = load_particles(str(star)).reader()
    order = epoch_order(N, 2, 0, True, reader.file_order(), 4096, 4)
    steps = shard_batches(order, BATCH, 0, 1)
    assert len(steps) % CHECK_EVERY != 0  # the last step is not one the guard reads in the epoch
    row = int(steps[-1][0])  # a particle of epoch 2's last step
    with mrcfile.open(stack, "r+") as m:
        m.data[row] = 1e25 * np.random.default_rng(0).normal(size=m.data.shape[1:]).astype(np.float32)
    with pytest.raises(TrainingDiverged, match=rf"loss became .* at epoch 2, batch {len(steps)}/{len(steps)}; .*"
                                               r"last good checkpoint \(epoch 1\)"):
        run_method(TRAIN_VAE, dict(particles=str(star), epochs=2, resume=True, **SMALL), out)
    assert (out / CHECKPOINT_NAME).read_bytes() == good


def test_the_logged_losses_are_the_mean_of_the_steps(sim: Path, tmp_path: Path) -> None:
    """With a learning rate of 0 the weights stay those of the start, so every step's loss can be recomputed."""
    pset = load_particles(str(sim / "particles.star"))
    cfg = VolumeConfig(box=32, apix=pset.apix, zdim=2, dec_layers=2, dec_dim=32, seed=0)
    opts = TrainOptions(epochs=2, batch_size=BATCH, lr=0.0, amp="no")
    objective, res = fit_neural(pset, cfg, {"kind": "amortised", "enc_layers": 2, "enc_dim": 32}, opts, tmp_path)
    lattice = Lattice(pset.box, pset.apix)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(cfg.max_freq * cfg.box), 0.85)
    prep.scale = cfg.data_scale
    reader = pset.reader()
    objective.train()
    for epoch in (1, 2):
        order = epoch_order(N, epoch, 0, True, reader.file_order(), opts.chunk_images, opts.shuffle_window)
        batches = shard_batches(order, BATCH, 0, 1)

        def transform(b: Batch) -> Batch:
            return Batch(b.rows, torch.empty(0), objective.inputs(prep(b)))

        gen_sum = reg_sum = count = 0.0
        with torch.no_grad():
            for step, batch in enumerate(BatchStream(reader, batches, transform, 2, opts.chunk_images)):
                b = len(batch.rows)
                gen, reg = objective(batch.data, _noise(0, epoch, step, b, objective.noise_dim, 0, b))
                gen_sum, reg_sum, count = gen_sum + float(gen) * b, reg_sum + float(reg) * b, count + b
        logged = res.history[epoch - 1]
        assert logged["gen_loss"] == pytest.approx(gen_sum / count, rel=1e-6)
        assert logged["kld"] == pytest.approx(reg_sum / count, rel=1e-5, abs=1e-9)
        assert logged["loss"] == pytest.approx((gen_sum + objective.kl_weight * reg_sum) / count, rel=1e-6)
