"""The batches copied to the GPU one step ahead (``data.device_feed``, #17 item 1): on a side stream, yet the very
same tensors in the same order as plain copies, with the host buffers pinned; and a CUDA training run gives the
same losses with the loader's thread on and off (to the GPU's reduction order). On a machine without CUDA they
fail rather than skip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryohet.data.device_feed import device_feed, pin
from cryohet.data.loader import Batch
from cryohet.inference.fit_neural import fit_neural
from cryohet.inference.trainer import TrainOptions, _noise
from cryohet.io.particles import load_particles
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.models.neural import VolumeConfig
from cryohet.runner import run_method


def test_the_feed_hands_out_the_batches_in_order_on_the_gpu() -> None:
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [Batch(np.arange(i, i + 4), torch.empty(0), pin({"y": torch.randn(4, 4096, 2, generator=g)}, cuda))
               for i in range(0, 40, 4)]
    assert all(b.data["y"].is_pinned() for b in batches)
    seen = []
    for batch, data in device_feed(batches, cuda):
        assert data["y"].device.type == "cuda"
        seen.append((batch.rows, (data["y"] * 2).sum().item()))  # used on the compute stream
    assert [r.tolist() for r, _ in seen] == [b.rows.tolist() for b in batches]
    assert np.allclose([s for _, s in seen], [(b.data["y"] * 2).sum().item() for b in batches], rtol=1e-5)


def test_the_latent_noise_is_drawn_on_the_gpu() -> None:
    """A step's latent noise comes from a generator on the GPU (no host copy): reproducible from its seed, and each
    rank's rows are its rows of the whole batch's draw."""
    a = _noise(0, 1, 2, 16, 8, 4, 12, torch.device("cuda"))
    assert a.device.type == "cuda" and a.shape == (8, 8)
    assert torch.equal(a, _noise(0, 1, 2, 16, 8, 4, 12, torch.device("cuda")))
    assert torch.equal(_noise(0, 1, 2, 16, 8, 0, 16, torch.device("cuda"))[4:12], a)
    assert not torch.equal(a, _noise(0, 1, 3, 16, 8, 4, 12, torch.device("cuda")))


def test_cuda_training_is_the_same_with_the_reader_thread_on_and_off(tmp_path: Path) -> None:
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=400, snr=1.0, n_states=10, threads=1,
                              seed=7), tmp_path / "sim")
    pset = load_particles(str(tmp_path / "sim" / "particles.star"))
    runs = []
    for prefetch in (4, 0):
        cfg = VolumeConfig(box=32, apix=pset.apix, zdim=2, dec_layers=2, dec_dim=64, seed=0)
        opts = TrainOptions(epochs=2, batch_size=40, lr=1e-3, amp="no", cache="memory", prefetch=prefetch)
        _, res = fit_neural(pset, cfg, {"kind": "amortised", "enc_layers": 2, "enc_dim": 64}, opts,
                            tmp_path / f"p{prefetch}", "cuda")
        runs.append(res)
    # equal up to the GPU's nondeterministic reductions (atomics in some backward kernels)
    assert np.allclose([h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history], rtol=1e-5)
    assert np.allclose(runs[0].z_mu, runs[1].z_mu, atol=1e-3)
