"""kernel-volumes: maps at latent points by kernel regression with the neighbourhood of each frequency shell chosen
by half-set cross-validation, checked against the true maps of simulated states, against the homogeneous
reconstruction (tested against relion_reconstruct in test_reconstruct.py), and for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cryohet.errors import InputError
from cryohet.geometry.fourier import fft3c, radius_grid
from cryohet.io.mrc import read_map
from cryohet.methods.kernel_volumes import METHOD
from cryohet.methods.reconstruct import METHOD as RECONSTRUCT
from cryohet.models.maps import MapsModel
from cryohet.reconstruct.fsc import fsc, fsc_auc
from cryohet.reconstruct.kernel import Whitening, choose_levels, combine_shells, neighbourhood_sizes
from cryohet.reconstruct.local_fsc import local_resolution
from cryohet.record import read_record
from cryohet.runner import run_method
from cryohet.validation.datasets import make_dataset

# long: make test runs this module in the current environment only (tests/conftest.py, one_stack)
pytestmark = pytest.mark.one_stack("current")

BOX, N = 32, 800


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    """Two discrete states of the bundled molecule (open, LID closed), 50/50, box 32 at 4 Å/px, SNR 0.5; the
    latent of each particle is its state plus a little noise."""
    folder = tmp_path_factory.mktemp("two_states")
    ds = make_dataset("discrete", folder, box=BOX, n_particles=N, snr=0.5, n_states=2,
                      populations=np.array([0.5, 0.5]), seed=3)
    state = np.load(folder / "ground_truth.npz")["state"]
    z = (state[:, None] + np.random.default_rng(0).normal(0, 0.05, (N, 1))).astype(np.float32)
    np.save(folder / "z.npy", z)
    return ds, state, folder / "z.npy"


@pytest.fixture(scope="module")
def kernel_run(two_states, tmp_path_factory):
    ds, _, zpath = two_states
    out = tmp_path_factory.mktemp("kernel")
    record = run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(zpath), "z": "0;1",
                                 "min_particles": 50, "threads": 2}, out)
    return out, record


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    return fsc_auc(fsc(a, b))


def test_neighbourhoods_whitening_and_shell_choice():
    """The ladder doubles up to all particles; whitened latents have unit covariance; the one-standard-error
    rule keeps the widest neighbourhood unless a narrower one predicts clearly better; shells are combined
    exactly."""
    assert neighbourhood_sizes(2000, 100, 6).tolist() == [125, 250, 500, 1000, 2000]
    assert neighbourhood_sizes(2000, 100, 3).tolist() == [500, 1000, 2000]
    assert neighbourhood_sizes(150, 100, 6).tolist() == [150]
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (5000, 3)) @ np.array([[3.0, 0, 0], [1.0, 0.5, 0], [0, 0, 1e-9]])
    w = Whitening(z)(z)
    # two directions of spread become unit variance; the direction without spread is not blown up
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(w, rowvar=False)), [0, 1, 1], atol=1e-6)
    # 3 levels, 200 validation images, 10 shells: equal errors up to noise -> the widest (2);
    # level 0 far better in shells 0-3 -> 0 there
    noise = rng.normal(0, 1.0, (3, 200, 10))
    errors = 100.0 + noise
    assert choose_levels(errors).tolist() == [2] * 10
    errors[0, :, :4] -= 5.0
    chosen = choose_levels(errors)
    assert chosen[:3].tolist() == [0, 0, 0] and chosen[6:].tolist() == [2] * 4
    # a level without signal in a shell (its half-map FSC below 0.143) cannot supply it, however low its error
    allowed = np.ones((3, 10), dtype=bool)
    allowed[0, :2] = False
    assert choose_levels(errors, allowed)[:2].tolist() == [2, 2]
    maps = [torch.randn(16, 16, 16) for _ in range(2)]
    pick = np.array([0] * 4 + [1] * 5)
    out = fft3c(combine_shells(maps, pick))
    shells = torch.round(radius_grid(16, 3)).long().clamp_max(8)
    for j in (0, 1):
        sel = torch.as_tensor(pick)[shells] == j
        torch.testing.assert_close(out[sel], fft3c(maps[j])[sel].to(out.dtype), atol=1e-4, rtol=1e-4)


def test_local_resolution_follows_the_noise():
    """Half-maps of one map with 6× the noise in one half of the box: that half's local resolution is worse;
    identical half-maps are at Nyquist everywhere."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0) - 16] * 3, indexing="ij"))
    vol = torch.exp(-(grid**2).sum(0) / 40.0) + 0.5 * torch.exp(-((grid[0] - 5) ** 2 + grid[1] ** 2) / 6.0)
    sigma = torch.full_like(vol, 0.02)
    sigma[:, :, 16:] *= 6
    h1, h2 = (vol + sigma * torch.randn(vol.shape, generator=g) for _ in range(2))
    res = local_resolution(h1, h2, 2.0)
    assert res.shape == (32,) * 3
    assert float(res[8:24, 8:24, 10:14].median()) < float(res[8:24, 8:24, 18:22].median())
    assert torch.all(local_resolution(vol, vol, 2.0) == 4.0)


def test_maps_at_each_state_match_its_true_map(two_states, kernel_run, tmp_path):
    """Measured: FSC AUC against the state's true map 0.66 / 0.66 for the kernel maps, 0.62 / 0.62 for the map of
    all particles, 0.48 / 0.48 against the other state's; the shells to 1/16 Å⁻¹ come from the state's own half of
    the particles, most shells beyond from all of them."""
    ds, _, _ = two_states
    out, record = kernel_run
    run_method(RECONSTRUCT, {"particles": str(ds.particles_star), "threads": 2}, tmp_path / "all")
    whole, _ = read_map(tmp_path / "all" / "map.mrc")
    truth = [ds.true_model().map(k) for k in (0, 1)]
    series = sorted(record.of_kind("volume_series"), key=lambda o: o.meta["index"])
    assert [o.meta["z"] for o in series] == [[0.0], [1.0]]
    for k in (0, 1):
        vol, apix = read_map(out / series[k].path)
        assert vol.shape == (BOX,) * 3 and apix == pytest.approx(ds.apix)
        own, other, homogeneous = _auc(vol, truth[k]), _auc(vol, truth[1 - k]), _auc(whole, truth[k])
        assert own > homogeneous + 0.03, (k, own, homogeneous)
        assert own > other + 0.03, (k, own, other)
        per_shell = np.array(series[k].meta["particles_per_shell"])
        assert per_shell[2:9].max() <= N // 2 and np.median(per_shell[9:]) == N
    halves = [o for o in record.of_kind("half_map")]
    assert len(halves) == 4 and len(record.of_kind("fsc")) == 2
    for o in record.of_kind("local_resolution"):  # between the FSC resolution's range and Nyquist, Å
        locres, _ = read_map(out / o.path)
        assert locres.shape == (BOX,) * 3 and locres.min() >= 2 * ds.apix - 1e-3
        assert 2 * ds.apix <= o.meta["median_A"] <= 30.0
    model = MapsModel.load(out / "kernel_maps.json")
    z = np.load(out / "latents.npy")
    assert model.labels(z).tolist() == (z[:, 0] > 0.5).astype(int).tolist()
    assert (out / "kernel_maps.png").stat().st_size > 0 and (out / "kernel_maps.cxc").is_file()
    assert read_record(out).status == "finished"


def test_one_neighbourhood_is_the_homogeneous_reconstruction(two_states, tmp_path):
    """With one level (all particles) every point's map is reconstruct's map of the same half-sets."""
    ds, _, zpath = two_states
    run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(zpath), "z": "0.5", "n_levels": 1,
                        "threads": 2}, tmp_path / "kv")
    run_method(RECONSTRUCT, {"particles": str(ds.particles_star), "threads": 2}, tmp_path / "rec")
    for name in ("", "_half1", "_half2"):
        a, _ = read_map(tmp_path / "kv" / "maps" / f"kernel_000{name}.mrc")
        b, _ = read_map(tmp_path / "rec" / f"{name[1:] or 'map'}.mrc")
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.abs(b).max()))


def test_default_points_and_a_run_as_input(two_states, kernel_run, tmp_path):
    """Without --z: k-means centres ordered along the first PC; --run reads another run's latents and particles."""
    out, _ = kernel_run
    record = run_method(METHOD, {"run": str(out), "n_points": 2, "min_particles": 100, "n_levels": 2,
                                 "threads": 2}, tmp_path / "again")
    z = [o.meta["z"][0] for o in sorted(record.of_kind("volume_series"), key=lambda o: o.meta["index"])]
    assert len(z) == 2 and z[0] < 0.3 and z[1] > 0.7


def test_bad_input_is_refused(two_states, tmp_path):
    """Latents of another length, too few particles, two inputs: clear errors naming the file, nothing written
    but the run's record and log."""
    ds, _, zpath = two_states
    np.save(tmp_path / "short.npy", np.zeros((N - 5, 1), dtype=np.float32))
    with pytest.raises(InputError, match=r"short\.npy.*795 latent rows but 800 particles"):
        run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(tmp_path / "short.npy")},
                   tmp_path / "a")
    with pytest.raises(InputError, match=r"z\.npy.*800 particles: kernel volumes need at least twice"):
        run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(zpath), "min_particles": 500},
                   tmp_path / "b")
    with pytest.raises(ValueError, match="give --run, or --particles with --latents, not both"):
        run_method(METHOD, {"run": str(tmp_path), "particles": str(ds.particles_star)}, tmp_path / "c")
    with pytest.raises(ValueError, match="latent point.*2 coordinates|2 values|dimension"):
        run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(zpath), "z": "0,1"},
                   tmp_path / "d")
    for out in ("a", "b", "c", "d"):
        assert {p.name for p in (tmp_path / out).iterdir()} <= {"cryohet_run.json", "run.log"}
