"""train-deform: the Zernike3D basis (flexutils' degrees and count, orthonormal on the ball by exact quadrature, its
radial polynomials and harmonics against SciPy's Jacobi polynomials and spherical harmonics); the fields start at
zero and follow the DeformationModel contract; the rigidity term against rotations and stretches; the
least-squares canonical map reproduces a map; on the simulated LID hinge of the bundled adenylate kinase (600
particles, SNR 1, box 32) both fields give a latent ordered by the true τ and per-image maps closer to the true
states (FSC AUC) than the consensus map; bad inputs through the CLI; resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special
from scipy.stats import spearmanr

from cryohet.analysis.latent import pca
from cryohet.cli import main
from cryohet.errors import InputError
from cryohet.geometry.gaussians import gaussian_map, lowpass_map
from cryohet.geometry.zernike3d import basis_degrees, radial_coefficients, solid_harmonics, zernike3d_basis
from cryohet.inference.deform_vae import field_jacobian, rigidity
from cryohet.io.atomic_model import box_centre_A
from cryohet.io.mrc import read_map, write_map
from cryohet.io.reader import ImageReader
from cryohet.models.base import load_volume_model
from cryohet.models.canonical_map import consensus_mask, fit_amplitudes, grid_points, point_atoms
from cryohet.models.deformation_fields import FlowField, ZernikeField
from cryohet.models.deformed_map import DeformedMap
from cryohet.record import read_record
from cryohet.simulate import simulate_particles
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.validation.metrics import volume_fsc

BOX, APIX, RES = 32, 3.0, 8.0
COMMON = ["--zdim", "2", "--threads", "1", "--device", "cpu", "--n_clusters", "0", "--n_maps", "4"]
#: measured (seed 0): |Spearman| of PC1 with τ 0.918 (zernike, 10 epochs), 0.887 (flow, 8 epochs); per-image FSC
#: AUC 0.692 (zernike), 0.702 (flow) against the consensus map's 0.648
MIN_SPEARMAN, MIN_AUC_GAIN = 0.8, 0.03


# ------------------------------------------------------------------------------------------- the basis


def _numcoefficients(l1: int, l2: int) -> int:
    """Xmipp's numCoefficients(l1, l2) (the Zernike3D coefficients per component), transcribed."""
    size = 0
    for h in range(l2 + 1):
        count = l1 - h + 1
        even = (count >> 1) + int(bool(count & 1) and not h & 1)
        size += (2 * h + 1) * (even if h % 2 == 0 else count - even)
    return size


def _ball_quadrature(nr: int = 10, nt: int = 10, nphi: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Points (Q, 3) and weights of a quadrature on the unit ball exact for polynomials of degree < 2·min(nr, nt)
    (Gauss-Legendre in r with weight r², in cos θ; uniform in φ)."""
    xr, wr = np.polynomial.legendre.leggauss(nr)
    r, wr = (xr + 1) / 2, wr / 2 * ((xr + 1) / 2) ** 2
    ct, wt = np.polynomial.legendre.leggauss(nt)
    ph = np.arange(nphi) * 2 * np.pi / nphi
    R, C, P = np.meshgrid(r, ct, ph, indexing="ij")
    S = np.sqrt(1 - C ** 2)
    xyz = np.stack([R * S * np.cos(P), R * S * np.sin(P), R * C], -1).reshape(-1, 3)
    w = (wr[:, None, None] * wt[None, :, None] * np.full(nphi, 2 * np.pi / nphi)[None, None, :]).ravel()
    return xyz, w


def _real_sph_harm(l: int, m: int, polar: np.ndarray, azimuth: np.ndarray) -> np.ndarray:  # noqa: E741
    """Real spherical harmonics from SciPy's complex ones (Condon-Shortley phase)."""
    if hasattr(special, "sph_harm_y"):
        y = special.sph_harm_y(l, abs(m), polar, azimuth)
    else:
        y = special.sph_harm(abs(m), l, azimuth, polar)
    if m == 0:
        return y.real
    return math.sqrt(2) * (-1) ** m * (y.imag if m < 0 else y.real)


def test_zernike3d_basis_degrees_orthonormality_and_reference() -> None:
    deg = basis_degrees(3, 2)
    assert len(deg) == 13 == _numcoefficients(3, 2)  # flexutils' L1 = 3, L2 = 2: 13 per component, 39 in all
    assert deg[:5] == [(0, 0, 0), (2, 0, 0), (1, 1, -1), (1, 1, 0), (1, 1, 1)]  # Xmipp's order
    for l1, l2 in ((5, 3), (7, 7), (4, 4), (8, 5)):
        assert len(basis_degrees(l1, l2)) == _numcoefficients(l1, l2)
    xyz, w = _ball_quadrature()
    for l1, l2 in ((3, 2), (7, 5)):
        b = zernike3d_basis(torch.as_tensor(xyz), basis_degrees(l1, l2)).numpy()
        gram = (b * w[:, None]).T @ b
        np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-10)
    # radial polynomials: √(2n+3) r^l P_k^(0, l+1/2)(2r² − 1); harmonics: SciPy's
    r = np.linspace(0.05, 1, 7)
    for n, ll, _ in basis_degrees(7, 5):
        ours = r ** ll * np.polyval(radial_coefficients(n, ll)[::-1], r ** 2)
        want = math.sqrt(2 * n + 3) * r ** ll * special.eval_jacobi((n - ll) // 2, 0, ll + 0.5, 2 * r ** 2 - 1)
        np.testing.assert_allclose(ours, want, rtol=1e-9, atol=1e-12)
    u = np.random.default_rng(0).normal(size=(20, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    polar, azimuth = np.arccos(u[:, 2]), np.arctan2(u[:, 1], u[:, 0])
    for (ll, m), v in solid_harmonics(torch.as_tensor(u), 4).items():
        np.testing.assert_allclose(v.numpy(), _real_sph_harm(ll, m, polar, azimuth), atol=1e-12)
    # zero outside the ball
    assert float(zernike3d_basis(torch.tensor([[0.8, 0.7, 0.0]]), deg).abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- model and terms


def _points(n: int = 60, seed: int = 0) -> np.ndarray:
    return box_centre_A(BOX, APIX) + np.random.default_rng(seed).uniform(-20, 20, (n, 3))


@pytest.mark.parametrize("kind", ["zernike", "flow"])
def test_fields_start_at_zero_and_follow_the_contract(kind: str) -> None:
    field = ZernikeField(3, 40.0) if kind == "zernike" else FlowField(3, 40.0, hidden=16)
    model = DeformedMap(point_atoms(_points(), np.ones(60), "test"), BOX, APIX, RES, 2.0, field)
    g = torch.Generator().manual_seed(7)  # draws of their own: the global generator's state depends on test order
    z = torch.randn(5, 3, generator=g)
    x = torch.randn(30, 3, generator=g) * 15
    with torch.no_grad():
        assert float(model.displacement_field(z, x).abs().max()) == 0.0
        assert float(model.displacements(z).abs().max()) == 0.0
        for p in model.field.parameters():
            p.normal_(0, 0.3, generator=g)
        d = model.displacements(z)
    assert d.shape == (5, 60, 3) and float(d.abs().max()) > 0.1
    torch.testing.assert_close(model.displacement_field(z, model.rel0_A).detach(), d)
    # the model's maps are its points moved by the field: frames_A = canonical + displacements (map frame)
    np.testing.assert_allclose(model.frames_A(z[:2].numpy()), model.atoms.xyz_A + d[:2].double().numpy(),
                               atol=1e-4)
    # the central differences of the field are its autograd Jacobian
    xs = x[:4].clone().requires_grad_(True)
    jac = field_jacobian(model.displacement_field, z[:1], xs, 1e-2)[0]
    for i in range(3):
        g = torch.autograd.grad(model.displacement_field(z[:1], xs)[0, :, i].sum(), xs)[0]
        torch.testing.assert_close(jac[:, i, :], g, atol=1e-2, rtol=1e-2)  # float32 differences


def test_rigidity_zero_for_rotations_and_translations_positive_for_stretches() -> None:
    rot = torch.as_tensor(special_ortho(), dtype=torch.float64)
    x = torch.randn(50, 3, dtype=torch.float64) * 10

    def field(mat: torch.Tensor, shift: float):
        return lambda _, p: (p @ (mat - torch.eye(3, dtype=p.dtype)).T + shift)[None]

    assert float(rigidity(field_jacobian(field(rot, 3.0), None, x, 1.0))) < 1e-20
    stretch = torch.diag(torch.tensor([1.1, 1.0, 1.0], dtype=torch.float64))
    assert float(rigidity(field_jacobian(field(stretch, 0.0), None, x, 1.0))) == pytest.approx(0.21 ** 2, rel=1e-9)


def special_ortho() -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_least_squares_points_reproduce_a_map() -> None:
    conf = hinge_conformations(default_molecule(), 2, 50.0, BOX, APIX, RES)
    vol = np.asarray(conf.maps[0], dtype=np.float32)
    mask = consensus_mask(vol, APIX, RES, None, 0.0, "map", None)
    xyz = grid_points(mask, APIX, RES / 2)
    centre = box_centre_A(BOX, APIX)
    fit = fit_amplitudes(xyz - centre, RES / 2, vol, APIX, RES)
    rendered = gaussian_map(xyz, fit.weights, BOX, APIX, RES, centre)
    low = lowpass_map(torch.as_tensor(vol, dtype=torch.float64), APIX, RES).numpy()
    print(f"{len(xyz)} points, residual {fit.residual:.4f}, {fit.iterations} iterations")
    assert 500 < len(xyz) < 3000 and fit.residual < 0.03
    assert np.corrcoef(rendered.ravel(), low.ravel())[0, 1] > 0.999
    assert np.abs(rendered - low).max() < 0.05 * low.max()


def test_automatic_mask_of_a_noisy_consensus() -> None:
    """An unmasked consensus from noisy images (the hinge map in a box of 64, white noise of its s.d.: 71 % of the
    positive density of its low-pass lies in the solvent, as in lb33m's SNR-0.1 reconstruction of igg-1d, 78 %)
    gets the mask of the clean map, which the mass check refused when it counted the solvent's noise as density;
    a mask in a corner is still refused."""
    conf = hinge_conformations(default_molecule(), 2, 50.0, BOX, APIX, RES)
    vol = np.pad(np.asarray(conf.maps[0], dtype=np.float64), BOX // 2)
    noisy = vol + vol.std() * np.random.default_rng(0).normal(size=vol.shape)
    clean = consensus_mask(vol, APIX, RES, None, 0.0, "map", None)
    mask = consensus_mask(noisy, APIX, RES, None, 0.0, "map", None)
    assert (mask & clean).sum() > 0.98 * clean.sum() and mask.sum() < 1.02 * clean.sum()   # measured 0.990, 1.008
    corner = np.zeros(vol.shape)
    corner[:8, :8, :8] = 1
    with pytest.raises(InputError, match="excludes the particle"):
        consensus_mask(noisy, APIX, RES, corner, 0.0, "map", "corner.mrc")


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 states of the LID closing by 0-50°, 600 particles at SNR 1; their homogeneous reconstruction."""
    d = tmp_path_factory.mktemp("deform")
    conf = hinge_conformations(default_molecule(), 20, 50.0, BOX, APIX, RES)
    sim = simulate_particles(conf, d / "sim", 600, 1.0, seed=0)
    assert main(["reconstruct", "--particles", str(sim.particles_star), "--o", str(d / "rec"), "--threads", "1",
                 "--device", "cpu"]) == 0
    gt = np.load(sim.ground_truth)
    return {"dir": d, "star": sim.particles_star, "consensus": d / "rec" / "map.mrc", "maps": d / "sim" / "maps",
            "state": gt["state"], "tau": gt["tau"][:, 0]}


def _train(data: dict, out: Path, *args: str) -> int:
    return main(["train-deform", "--particles", str(data["star"]), "--consensus_map", str(data["consensus"]),
                 "--o", str(out), *COMMON, *args])


def _per_image_auc(model: DeformedMap, z: np.ndarray, data: dict) -> tuple[float, float]:
    """Mean FSC AUC of the maps at 3 particles' latents per state (every other state) against the true maps, and
    the consensus map's against the same true maps."""
    rng = np.random.default_rng(0)
    consensus = read_map(data["consensus"])[0]
    ours, base = [], []
    for s in range(0, 20, 2):
        truth = read_map(data["maps"] / f"state_{s:03d}.mrc")[0]
        idx = rng.choice(np.flatnonzero(data["state"] == s), 3, replace=False)
        ours += [volume_fsc(v, truth, APIX)["auc"] for v in model.volumes(z[idx])]
        base.append(volume_fsc(consensus, truth, APIX)["auc"])
    return float(np.mean(ours)), float(np.mean(base))


@pytest.mark.parametrize("kind,args", [("zernike", ("--epochs", "10")), ("flow", ("--epochs", "8"))])
def test_hinge_latent_and_per_image_maps(data: dict, tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    out = tmp_path / kind
    assert _train(data, out, "--field", kind, *args) == 0
    z = np.load(out / "z.npy").astype(np.float64)
    rho = abs(spearmanr(pca(z, 1).transform(z)[:, 0], data["tau"])[0])
    model = load_volume_model(out)
    assert isinstance(model, DeformedMap) and model.field.kind == kind
    ours, base = _per_image_auc(model, z, data)
    report = json.loads((out / "deform_fit.json").read_text())
    print(f"{kind}: |Spearman| {rho:.3f}; per-image FSC AUC {ours:.3f}, consensus {base:.3f}; "
          f"{report['consensus_fit']}; epoch {np.mean(report['epoch_seconds']):.1f} s")
    assert rho > MIN_SPEARMAN
    assert ours > base + MIN_AUC_GAIN
    # outputs: every kind recorded, the displacements along PC1 match the points' models, the report's terms
    kinds = {o.kind for o in read_record(out).outputs}
    assert {"model", "latents", "particles_star", "volume_series", "volume", "mask", "atomic_model", "chimerax",
            "plot", "report"} <= kinds
    disp, pts = np.load(out / "pc1_displacements.npy"), np.load(out / "canonical_points.npy")
    assert disp.shape == (4, len(model.atoms), 3) and pts.shape == (len(model.atoms), 3)
    assert np.sqrt((disp ** 2).sum(-1).mean(-1)).max() > 1.0  # the hinge moves the LID by several Å
    assert report["consensus_fit"]["correlation_start"] > 0.98
    assert [t["epoch"] for t in report["terms"]] == list(range(1, int(args[1]) + 1))
    assert report["regulariser_weights"]["rigidity"] > 0


def test_bad_inputs(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vol, _ = read_map(data["consensus"])
    write_map(tmp_path / "box40.mrc", np.pad(vol, 4), APIX)
    write_map(tmp_path / "apix.mrc", vol, 2.0)
    corner = np.zeros_like(vol)
    corner[:4, :4, :4] = 1
    write_map(tmp_path / "corner.mrc", corner, APIX)
    cases = [(["--consensus_map", str(tmp_path / "box40.mrc")], "box40.mrc", "box is 32"),
             (["--consensus_map", str(tmp_path / "apix.mrc")], "apix.mrc", "Å/px"),
             (["--mask", str(tmp_path / "corner.mrc")], "corner.mrc", "excludes the particle"),
             (["--grid_A", "0.2"], "map.mrc", "enough for")]
    for i, (args, name, words) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert _train(data, out, *args) == 2
        err = capsys.readouterr().err
        assert name in err and words in err, err
        assert not (out / "model.safetensors").exists() and not (out / "z.npy").exists()


def test_resume_retraces_an_uninterrupted_run(data: dict, tmp_path: Path) -> None:
    base = ["--batch_size", "64", "--n_maps", "2"]
    assert _train(data, tmp_path / "full", "--epochs", "2", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "1", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "2", "--resume", "yes", "--overwrite", "yes", *base) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cut" / "z.npy"), np.load(tmp_path / "full" / "z.npy"),
                               atol=1e-5)
    full, cut = (json.loads((tmp_path / d / "deform_fit.json").read_text()) for d in ("full", "cut"))
    assert len(cut["terms"]) == 2 and cut["regulariser_weights"] == full["regulariser_weights"]
    for a, b in zip(full["terms"], cut["terms"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_the_prepared_image_cache_serves_the_later_epochs(data: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """train-deform (like train-gmm, train-atomic and fit-modes' amortised fit, all on the shared trainer) takes
    ``--cache``: with it the second epoch and the final latents read no image, and training agrees with the run
    that reads every image every epoch (the cache holds the prepared transforms in float16)."""
    reads = {"n": 0}
    original = ImageReader.read

    def read(reader: ImageReader, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        reads["n"] += len(rows)
        return original(reader, rows, out)

    monkeypatch.setattr(ImageReader, "read", read)
    counts = {}
    for cache in ("off", "memory"):
        reads["n"] = 0
        assert _train(data, tmp_path / cache, "--epochs", "2", "--batch_size", "64", "--n_maps", "2",
                      "--cache", cache) == 0
        counts[cache] = reads["n"]
    per_epoch = len(data["state"]) // 64 * 64  # an epoch's whole batches: the rows the first epoch caches
    assert counts["off"] - counts["memory"] == 2 * per_epoch  # epoch 2 and the final latents' cached rows
    assert "prepared-image cache" in (tmp_path / "memory" / "run.log").read_text()
    off, mem = (json.loads((tmp_path / d / "deform_fit.json").read_text())["terms"] for d in ("off", "memory"))
    for a, b in zip(off, mem, strict=True):
        assert b["data"] == pytest.approx(a["data"], rel=5e-3)
    z_off, z_mem = np.load(tmp_path / "off" / "z.npy"), np.load(tmp_path / "memory" / "z.npy")
    assert np.corrcoef(z_off[:, 0], z_mem[:, 0])[0, 1] > 0.99
