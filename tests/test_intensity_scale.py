"""One intensity scale for every method's maps, whatever the Fourier crop (the shared image preparation).

The same particles go through reconstruct, principal-volumes and train-vae, each with and without cropping; every
map is compared at low resolution, by its least-squares scale, with reconstruct's map at the full box (which the
tests of reconstruct match to relion_reconstruct). Before the shared preparation, cropping from box N to n scaled
reconstruct's maps by (N/n)³ and the VAE's by N/n.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.inference.ppca import band_limit
from cryohet.io.mrc import read_map
from cryohet.methods.principal_volumes import METHOD as PRINCIPAL_VOLUMES
from cryohet.methods.reconstruct import METHOD as RECONSTRUCT
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.models.base import load_volume_model
from cryohet.runner import run_method

# long: make test runs this module in the pinned environment only (tests/conftest.py, one_stack)
pytestmark = pytest.mark.one_stack("pinned")

BOX, CROP, APIX = 32, 16, 4.0
COMPARE_A = 20.0   # compare the maps below this resolution (inside every method's band)


@pytest.fixture(scope="module")
def particles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scale")
    run_method(SIMULATE, dict(box=BOX, apix=APIX, resolution_A=10.0, n_particles=500, snr=5.0, n_states=5,
                              max_angle_deg=5.0, threads=2, seed=11), out)
    return out


def _scale(vol: np.ndarray, apix: float, truth: np.ndarray) -> float:
    """Least-squares scale s of ``vol`` ≈ s · truth, both Fourier-cropped to CROP and low-passed to COMPARE_A."""
    a = fourier_crop_3d(torch.tensor(vol), CROP).numpy() if vol.shape[0] != CROP else vol
    b = fourier_crop_3d(torch.tensor(truth), CROP).numpy() if truth.shape[0] != CROP else truth
    apix_c = APIX * BOX / CROP
    a, b = band_limit(a, apix_c, COMPARE_A).astype(np.float64), band_limit(b, apix_c, COMPARE_A).astype(np.float64)
    return float((a * b).sum() / (b * b).sum())


def test_every_method_writes_maps_on_one_scale_whatever_the_crop(particles: Path, tmp_path: Path) -> None:
    star = str(particles / "particles.star")
    run_method(RECONSTRUCT, dict(particles=star, threads=2), tmp_path / "ref")
    truth, _ = read_map(tmp_path / "ref" / "map.mrc")
    scales = {}
    for box in (0, CROP):
        out = tmp_path / f"rec{box}"
        run_method(RECONSTRUCT, dict(particles=star, box=box, threads=2, seed=1), out)
        vol, apix = read_map(out / "map.mrc")
        scales[f"reconstruct box {box or BOX}"] = _scale(vol, apix, truth)
    for res in (0.0, 20.0):   # 20 Å: the images are cropped to a working box of 16 px
        out = tmp_path / f"pv{res}"
        run_method(PRINCIPAL_VOLUMES, dict(particles=star, n_components=1, resolution_A=res, max_iter=3,
                                           threads=2), out)
        vol, apix = read_map(out / "mean.mrc")
        scales[f"principal-volumes {res or 'Nyquist'}"] = _scale(vol, apix, truth)
    for crop in (0, CROP):
        out = tmp_path / f"vae{crop}"
        run_method(TRAIN_VAE, dict(particles=star, crop_box=crop, zdim=1, epochs=3, enc_dim=64, dec_dim=128,
                                   batch_size=32, lr=2e-3, threads=2), out)
        model = load_volume_model(out)
        z = np.load(out / "z.npy").mean(0, keepdims=True)
        scales[f"train-vae box {crop or BOX}"] = _scale(model.volumes(z)[0], model.apix, truth)
    print("scale of each method's map against reconstruct's at the full box:", scales)
    for name, s in scales.items():
        assert 0.85 < s < 1.15, (name, s)
    for method in ("reconstruct", "principal-volumes", "train-vae"):
        pair = [s for k, s in scales.items() if k.startswith(method)]
        assert max(pair) / min(pair) < 1.15, (method, pair)
