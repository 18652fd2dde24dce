"""The covariance filters (``train-vae --filters_from covariance``, train-vae's default) estimated on the GPU are the
CPU's: the same residuals streamed to a bank on CUDA give the same leading filters (to float32 reduction order)
and the same shells' SNR, and their responses read the motion as well. On a machine without CUDA it fails rather
than skips."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_filter_covariance import _motion_responses  # noqa: E402

from cryohet.inference.filter_covariance import covariance_filters  # noqa: E402


def test_covariance_filters_on_the_gpu_are_the_cpus() -> None:
    cuda = torch.device("cuda")
    rot = torch.as_tensor(Rotation.random(600, random_state=2).as_matrix(), dtype=torch.float32)
    for noise in (2.0, 5.0):  # SNR about 0.3 and 0.04 in the filters' circle (the Wiener term at work)
        r_cpu, _, f_cpu, bank, signals, snr_cpu = _motion_responses(rot, (3.0, 0.0, 0.0), noise, 1)
        bank = bank.to(cuda)

        def on_gpu(signals=signals):
            for batch in signals():
                yield tuple(t.to(cuda) for t in batch)

        f_gpu, snr_gpu = covariance_filters(bank, on_gpu, 2, seed=0)
        assert f_gpu.device.type == "cuda" and snr_gpu.device.type == "cuda"
        f_gpu, snr_gpu = f_gpu.cpu(), snr_gpu.cpu()
        cosine = (f_gpu * f_cpu).sum(0) / (f_gpu.norm(dim=0) * f_cpu.norm(dim=0))
        print(f"noise {noise}: cosines of the GPU's filters with the CPU's {cosine.tolist()}")
        assert bool((cosine > 0.999).all()), cosine
        torch.testing.assert_close(snr_gpu, snr_cpu, rtol=1e-3, atol=1e-4)
        responses = torch.cat([bank.adjoint(*b) @ f_gpu.to(cuda)[:, :1] for b in on_gpu()]).cpu()
        a = np.random.default_rng(1).normal(size=len(rot))  # the coordinate _motion_responses drew
        r_gpu = abs(np.corrcoef(responses[:, 0].numpy(), a)[0, 1])
        assert abs(r_gpu - r_cpu) < 0.01, (r_gpu, r_cpu)
