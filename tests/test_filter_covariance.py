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
from cryohet.inference.amortised import REPRODUCIBLE
from cryohet.inference.filter_covariance import POWER_PASSES, covariance_filters, signal_extent
from cryohet.inference.pose_filters import PoseFilterBank
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.methods.train_vae import METHOD as TRAIN_VAE
from cryohet.runner import run_method
from cryohet.validation.metrics import spearman_pc1

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
BOX, FREQ = 24, 0.25
SETTINGS = dict(enc_dim=64, dec_dim=64, batch_size=32, lr=1e-3, threads=1)
VIEWS = ("uniform", "80 % near the top view", "tilts up to 30°", "side views about one axis")


def views(kind: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 3, 3) rotations (one of ``VIEWS``): uniform; 80 % tilted |N(0, 15°)| from the top view and the rest
    uniform; tilts up to 30° (uniform on the cap); side views (tilt 90 ± 5°) with the first angle within ±20°
    (about one axis)."""
    if kind == "uniform":
        return torch.as_tensor(Rotation.random(n, random_state=2).as_matrix(), dtype=torch.float32)
    rot, psi = rng.uniform(0, 360, n), rng.uniform(0, 360, n)
    if kind.startswith("80 %"):
        tilt = np.where(rng.random(n) < 0.8, np.abs(rng.normal(0, 15, n)),
                        Rotation.random(n, random_state=3).as_euler("ZYZ", degrees=True)[:, 1])
    elif kind.startswith("tilts"):
        tilt = np.degrees(np.arccos(rng.uniform(np.cos(np.radians(30)), 1, n)))
    else:
        tilt, rot = 90 + rng.normal(0, 5, n), rng.normal(0, 20, n)
    euler = np.stack([rot, tilt, psi], 1)
    return torch.as_tensor(Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix(), dtype=torch.float32)


def _blob(box: int, centre: tuple[float, float, float], sigma: float) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2))


def _bank(n_filters: int, box: int = BOX, freq: float = FREQ):
    """The half-plane points of a box at 4 Å/px and a fixed filter bank on them (maps drawn from seed 0)."""
    points = Lattice(box, 4.0).half_plane()
    return points, PoseFilterBank(n_filters, box, points.kxy, points.weight, freq, torch.Generator().manual_seed(0),
                                  fixed=True)


def _ctf_like(kxy: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, M) CTF-like sign patterns cos(40 d |k|²), defocus-like d uniform in [0.5, 1.5] from ``rng``."""
    defocus = torch.as_tensor(rng.uniform(0.5, 1.5, size=(n, 1)), dtype=torch.float32)
    return torch.cos(40 * defocus * kxy.norm(dim=-1) ** 2)


def _motion_responses(rot: torch.Tensor, motion_px: tuple[float, float, float], noise: float, seed: int
                      ) -> tuple[float, float, torch.Tensor, PoseFilterBank, Callable, torch.Tensor]:
    """Residuals a_i · CTF_i · slice_i(u) + noise at the views ``rot`` (u: a blob moved by ± ``motion_px``,
    a_i standard normal; the noise's s.d. ``noise`` times the signal's in the filters' circle), streamed in
    batches of 100: |r| of the leading covariance filter's responses with a_i, |r| of the motion's own map as the
    filter (the best a filter can do), the two filters and the bank, the stream, and the shells' SNR."""
    points, bank = _bank(2)
    u = _blob(BOX, motion_px, 2.5) - _blob(BOX, tuple(-m for m in motion_px), 2.5)
    n = len(rot)
    rng = np.random.default_rng(seed)
    a = torch.as_tensor(rng.normal(size=n), dtype=torch.float32)
    ctf = _ctf_like(points.kxy, n, rng)
    signal = torch.view_as_real(Projector(u).slice_points(rot, points.kxy) * ctf * a[:, None])
    inside = points.kxy.norm(dim=-1) <= FREQ
    noise_sd = noise * float(signal[:, inside].std())
    residual = signal + noise_sd * torch.randn(signal.shape, generator=torch.Generator().manual_seed(seed + 2))

    def signals():
        for s in range(0, n, 100):
            yield rot[s:s + 100], ctf[s:s + 100], residual[s:s + 100]

    f, shell_snr, _ = covariance_filters(bank, signals, 2, seed=0)
    r = abs(np.corrcoef((bank.adjoint(rot, ctf, residual) @ f)[:, 0].numpy(), a.numpy())[0, 1])
    truth = PoseFilterBank(1, BOX, points.kxy, points.weight, FREQ, torch.Generator(), fixed=True)
    truth.set_maps(u[None])
    best = abs(np.corrcoef(truth(rot, ctf, residual)[:, 0].numpy(), a.numpy())[0, 1])
    return r, best, f, bank, signals, shell_snr


def test_the_leading_filter_reads_each_images_coordinate_along_the_motion() -> None:
    """Uniform views, SNR about 0.3 in the filters' circle: the leading filter's responses follow a_i (|r| above
    0.95 of the motion's own); the filters are zero outside the resolution circle, of unit RMS, their largest real
    part positive, the same for the same seed, and made in 5 passes."""
    rot = torch.as_tensor(Rotation.random(600, random_state=2).as_matrix(), dtype=torch.float32)
    r, best, f, bank, signals, _ = _motion_responses(rot, (3.0, 0.0, 0.0), 2.0, 1)
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

    torch.testing.assert_close(covariance_filters(bank, counted, 2, seed=0)[0], f)
    assert len(passes) == POWER_PASSES
    with pytest.raises(ValueError, match="passes must be at least 2"):
        covariance_filters(bank, signals, 2, passes=1)


@pytest.mark.parametrize("kind, motion_px", [("tilts up to 30°", (0.0, 0.0, 3.0)),
                                             ("80 % near the top view", (3.0, 0.0, 0.0))])
def test_preferred_views_do_not_drown_the_motion(kind: str, motion_px: tuple[float, float, float]) -> None:
    """Voxels that few views reach are not amplified until their noise makes the leading eigenvector (the density
    floor, and the Wiener term where their shells hold little signal): with views no more tilted than 30° and a
    motion along z (Fourier content near the missing cone), and with 80 % of the views within about 15° of the top
    view, the leading filter still reads each image's coordinate (|r| above 0.8 of the motion's own; with neither
    term, S = 1 / D, 0.52 and 0.49 of 0.85 and 0.96)."""
    r, best, *_ = _motion_responses(views(kind, 600, np.random.default_rng(5)), motion_px, 2.0, 1)
    print(f"{kind}: |r| {r:.3f}, the motion's own {best:.3f}")
    assert r > 0.8 * best, (r, best)


def test_low_snr_shells_do_not_drown_the_motion() -> None:
    """SNR about 0.04 in the filters' circle with uniform views: 1 / D amplifies the outer shells' noise until it
    makes the leading eigenvectors (|r| 0.06 and 0.11 without the Wiener term); weighted down by the shells' estimated
    SNR, the leading filter still reads each image's coordinate (|r| above 0.9 of the motion's own). The estimated
    SNR falls with the noise and is below 1 beyond the motion's Fourier extent (the blobs' s.d. is 2.5 px)."""
    rot = views("uniform", 600, np.random.default_rng(5))
    for motion_px in ((3.0, 0.0, 0.0), (0.0, 0.0, 3.0)):
        r, best, *_, low = _motion_responses(rot, motion_px, 5.0, 1)
        print(f"motion {motion_px}: |r| {r:.3f}, the motion's own {best:.3f}")
        assert r > 0.9 * best, (r, best)
    *_, high = _motion_responses(rot, (0.0, 0.0, 3.0), 5.0 / 3, 1)
    print("shells' SNR at 3× the noise", [f"{v:.2f}" for v in low], "at 1×", [f"{v:.2f}" for v in high])
    above = high > 1
    assert bool(above[1:4].all()) and bool((low[above] < high[above] / 2).all())
    assert len(low) == 7 and bool((high[5:] < 1).all()) and bool((low[4:] < 1).all()) and bool((low >= 0).all())


@pytest.mark.parametrize("kind, motion_px", [("tilts up to 30°", (3.0, 0.0, 0.0)),
                                             ("tilts up to 30°", (0.0, 0.0, 3.0)),
                                             ("80 % near the top view", (3.0, 0.0, 0.0))])
def test_preferred_views_at_low_snr(kind: str, motion_px: tuple[float, float, float]) -> None:
    """SNR about 0.03 in the filters' circle with preferred views: shells of noise alone whose power above the
    noise's estimate is a chance excess are not read as signal (the excess less two of its standard errors), so the
    leading filter still reads each image's coordinate (|r| above 0.8 of the motion's own; 0.20, 0.11 and 0.48
    when the excess itself was taken)."""
    r, best, *_ = _motion_responses(views(kind, 600, np.random.default_rng(5)), motion_px, 6.0, 1)
    print(f"{kind}, motion {motion_px}: |r| {r:.3f}, the motion's own {best:.3f}")
    assert r > 0.8 * best, (r, best)


def _pure_noise(rot: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    """The shells' SNR that ``covariance_filters`` estimates from residuals of pure noise (s.d. 3, drawn from
    ``seed``) at the views ``rot``, with a CTF-like sign pattern, and the leading direction's reproducibility."""
    points, bank = _bank(2)
    n = len(rot)
    ctf = _ctf_like(points.kxy, n, np.random.default_rng(seed))
    noise = 3.0 * torch.randn(n, len(points.kxy), 2, generator=torch.Generator().manual_seed(seed + 2))
    return covariance_filters(bank, lambda: zip(rot.split(100), ctf.split(100), noise.split(100)), 2)[1:]


def test_pure_noise_has_no_variance_above_the_noise() -> None:
    """Residuals of pure noise (no conformations), three draws at each of four view sets: the noise's share of the
    covariance's diagonal is estimated from the residuals' power per ring and taken off with two standard errors of
    the rest, so no shell's SNR is above 0.1 (the excess alone read SNR up to 4.3 in a shell of these draws)."""
    snr = torch.stack([_pure_noise(views(kind, 600, np.random.default_rng(5)), seed)[0]
                       for kind in VIEWS for seed in (1, 2, 3)])
    print(f"largest shell SNR of pure noise: {float(snr.max()):.3f}")
    assert snr.shape == (12, 7) and float(snr.abs().max()) < 0.1


def test_the_split_halves_tell_a_motion_from_noise() -> None:
    """The leading direction's variance in one half of the particles against a random direction's in the other
    half, in standard deviations: pure noise gives about 0 at every view set (measured −2.5 to 2.1, below
    ``REPRODUCIBLE``, so a learnt bank beside the filters is read), a motion at SNR about 0.04 and 0.3 clearly more
    (6.9, near the most that a subspace of 10 directions allows, 7.3; above it, so the covariance filters are left
    to read it alone)."""
    noise = [_pure_noise(views(kind, 600, np.random.default_rng(5)), 1)[1] for kind in VIEWS]
    rot = views("uniform", 600, np.random.default_rng(5))
    motion = []
    for sd in (5.0, 2.0):
        *_, bank, signals, _ = _motion_responses(rot, (3.0, 0.0, 0.0), sd, 1)
        motion.append(covariance_filters(bank, signals, 2, seed=0)[2])
    print("split-half reproducibility of noise", [f"{v:.2f}" for v in noise], "of the motion",
          [f"{v:.2f}" for v in motion])
    assert all(abs(v) < REPRODUCIBLE for v in noise), noise
    assert min(motion) > 1.5 * REPRODUCIBLE, motion


def test_noise_gains_are_the_noise_operators_diagonal() -> None:
    """The noise's diagonal from the gains by ring offset and a variance per ring is the diagonal of Σ_i A_i N A_iᵀ,
    A_i the adjoint's matrix (built column by column from unit signals), N the ring-wise variance, except at the
    origin where the taps of +p and −p meet; split into groups of images, each group's gains are its images'
    alone."""
    points, bank = _bank(1, box=12)
    rot = torch.as_tensor(Rotation.random(3, random_state=1).as_matrix(), dtype=torch.float32)
    ctf = torch.rand(3, len(points.kxy), generator=torch.Generator().manual_seed(1))
    gains = bank.noise_gains(rot, ctf)[0]
    split = bank.noise_gains(rot, ctf, groups=torch.tensor([1, 0, 1]), n_groups=2)
    torch.testing.assert_close(split.sum(0), gains)
    torch.testing.assert_close(split[0], bank.noise_gains(rot[1:2], ctf[1:2])[0])
    ring_var = torch.rand(int(bank.rings().max()) + 1, generator=torch.Generator().manual_seed(2)) + 0.5
    var = torch.zeros(len(points.kxy))
    var[bank.sel] = ring_var[bank.rings()]
    diag = torch.zeros(2 * bank.n_voxels, dtype=torch.float64)
    for i in range(len(rot)):
        for m in bank.sel.tolist():
            for part in (0, 1):
                unit = torch.zeros(1, len(points.kxy), 2)
                unit[0, m, part] = 1.0
                diag += var[m].double() * bank.adjoint(rot[i:i + 1], ctf[i:i + 1], unit)[0].double().pow(2)
    expected = bank.noise_diagonal(gains, ring_var).double()
    off_origin = bank.voxel_radii() > 0
    for part in (diag[:bank.n_voxels], diag[bank.n_voxels:]):
        torch.testing.assert_close(part[off_origin], expected[off_origin], rtol=1e-4, atol=1e-7)


def test_signal_extent_says_where_the_variance_is_above_the_noise() -> None:
    snr = torch.tensor([0.0, 9.0, 3.0, 1.2, 0.5, 0.1])
    assert signal_extent(snr, 300.0) == ("the conformations' variance is above the noise to 100.0 Å (shells where "
                                         "it is below, weighted down: 2 of 5)")
    assert "below the noise in every Fourier shell" in signal_extent(torch.full((4,), 0.5), 300.0)


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


def test_learnt_filters_beside_the_covariance_ones(hinge: Path, tmp_path: Path) -> None:  # noqa: F811
    """``--learnt_filters 4``: four learnt maps at --filter_res_A beside the 3 covariance filters, recorded in the
    run and kept by resuming. Where the covariance's leading direction reproduces across halves of the particles
    (the hinge at SNR 1) they are not read: they stay at zero and the latent follows the hinge angle as with the
    covariance filters alone; where it does not (SNR 0.001, no direction above the noise) they are read and learnt.
    With learnt filters only, the option is ignored with a warning."""
    star = str(hinge / "particles.star")
    run_method(TRAIN_VAE, dict(particles=star, epochs=3, learnt_filters=4, **SETTINGS), tmp_path / "vae")
    inference = json.loads((tmp_path / "vae" / "config.json").read_text())["inference"]
    assert inference["filters_from"] == "covariance" and inference["encoder_filters"] == 3
    assert inference["learnt_filters"] == 4 and inference["learnt_filter_freq"] == pytest.approx(4.0 / 20.0)
    log = (tmp_path / "vae" / "run.log").read_text()
    assert "4 learnt filter maps beside them to 20 Å" in log and "maps beside them are not read" in log
    weights = load_file(str(tmp_path / "vae" / "model.safetensors"))
    assert weights["learnt.values"].shape[1] == 4 and float(weights["learnt.values"].abs().max()) == 0
    assert float(weights["learnt_used"]) == 0
    rho = spearman_pc1(np.load(tmp_path / "vae" / "z.npy"), np.load(hinge / "ground_truth.npz")["tau"])
    print(f"hinge |Spearman| PC1 with covariance and 4 learnt filters: {rho:.3f}")
    assert rho > 0.8, rho
    run_method(TRAIN_VAE, dict(particles=star, epochs=4, resume=True, **SETTINGS), tmp_path / "vae")
    resumed = load_file(str(tmp_path / "vae" / "model.safetensors"))
    assert len(json.loads((tmp_path / "vae" / "config.json").read_text())["history"]) == 4
    torch.testing.assert_close(resumed["filters.values"], weights["filters.values"])
    assert float(resumed["learnt_used"]) == 0
    noise = tmp_path / "noise"
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=400, snr=0.001, n_states=20,
                              threads=1, seed=3), noise)
    run_method(TRAIN_VAE, dict(particles=str(noise / "particles.star"), epochs=1, learnt_filters=4, **SETTINGS),
               tmp_path / "read")
    assert "maps beside them are read" in (tmp_path / "read" / "run.log").read_text()
    weights = load_file(str(tmp_path / "read" / "model.safetensors"))
    assert float(weights["learnt_used"]) == 1 and float(weights["learnt.values"].abs().max()) > 0
    run_method(TRAIN_VAE, dict(particles=star, epochs=1, learnt_filters=4, filters_from="learnt", **SETTINGS),
               tmp_path / "learnt")
    assert "learnt_filters" not in json.loads((tmp_path / "learnt" / "config.json").read_text())["inference"]
    assert "--learnt_filters 4 ignored" in (tmp_path / "learnt" / "run.log").read_text()
    assert "the encoder's filters are learnt already" in (tmp_path / "learnt" / "run.log").read_text()


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
