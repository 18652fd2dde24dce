"""train-gmm: the displacement field interpolates the Gaussians' own displacements; the Gaussians fitted to a
consensus map reproduce it; on the simulated LID hinge of the bundled adenylate kinase (600 particles, SNR 3,
box 32) the latent orders the particles by the true τ, the maps at the latents of particles at the ends of the
motion are closer to their true maps than the consensus map, and the half-set deformation error is small on the
static core and large on the moving LID; resume (with Gaussians on the residues of an atomic model); bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from cryohet.analysis.latent import pca
from cryohet.cli import main
from cryohet.io.atomic_model import Atoms, box_centre_A, write_models
from cryohet.io.mrc import read_map, write_map
from cryohet.io.particles import load_particles
from cryohet.models.base import load_volume_model
from cryohet.models.gaussian_mixture import GaussianMixture, fit_amplitudes, spacing_A
from cryohet.models.pseudo_atoms import place_pseudo_atoms
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at
from cryohet.record import read_record
from cryohet.simulate import simulate_particles
from cryohet.simulate.atomic_truth import hinge_truth

BOX, APIX, RES = 32, 3.0, 8.0
COMMON = ["--zdim", "2", "--threads", "1", "--device", "cpu", "--batch_size", "16", "--n_maps", "4"]
#: |Spearman| of the latent's PC1 with τ: measured 0.91 (800 particles, 8 epochs, all defaults but batch 16).
MIN_SPEARMAN = 0.8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 states of the LID closing by 0-50°, 600 particles at SNR 3, their consensus map (cryohet reconstruct)
    and the open state's heavy atoms in the map frame."""
    d = tmp_path_factory.mktemp("hinge")
    truth = hinge_truth(20, 50.0, BOX, APIX, RES)
    sim = simulate_particles(truth.conf, d, 600, 3.0, seed=0)
    assert main(["reconstruct", "--particles", str(sim.particles_star), "--o", str(d / "cons"), "--threads", "1",
                 "--device", "cpu"]) == 0
    write_models(d / "ref.pdb", truth.heavy, truth.heavy.xyz_A[None])
    gt = np.load(sim.ground_truth)
    return {"dir": d, "star": sim.particles_star, "map": d / "cons" / "map.mrc", "ref": d / "ref.pdb",
            "ca": truth.ca_frames_A, "state": gt["state"], "tau": gt["tau"][:, 0]}


def _train(data: dict, out: Path, *args: str) -> int:
    return main(["train-gmm", "--particles", str(data["star"]), "--consensus_map", str(data["map"]),
                 "--o", str(out), *COMMON, *args])


# ------------------------------------------------------------------------------------------- the model


def test_displacement_field_interpolates_the_gaussians() -> None:
    """At the Gaussians' centres the field is their own displacement; elsewhere a convex combination of its
    nearest Gaussians' (each coordinate between their extremes); chunking changes nothing."""
    g = np.random.default_rng(0)
    xyz = g.uniform(30, 66, (300, 3))
    n = len(xyz)
    atoms = Atoms(xyz, np.ones(n), np.full(n, "A"), np.arange(1, n + 1), np.full(n, "PSE"), np.full(n, "CA"),
                  np.full(n, "C"), Path("random"))
    model = GaussianMixture(atoms, BOX, APIX, RES, zdim=3, spacing_A=spacing_A(xyz))
    with torch.no_grad():
        model.mlp.out.weight.normal_(0, 1.0)
        model.mlp.out.bias.normal_(0, 2.0)
    z = torch.randn(4, 3)
    with torch.no_grad():
        own = model.displacements(z)
        at_centres = model.displacement_field(z, model.rel0_A)
        assert float((at_centres - own).abs().max()) < 1e-4 * float(own.abs().max())
        pts = torch.as_tensor(g.uniform(-15, 15, (500, 3)), dtype=torch.float32)
        field = model.displacement_field(z, pts)
        assert torch.equal(field, model.displacement_field(z, pts, chunk_points=37))
        assert model.interpolation(pts, torch.device("cpu"), 37) is model.interpolation(pts, torch.device("cpu"), 37)
        moved = pts.clone()
        assert torch.equal(model.displacement_field(z, moved), field)
        moved[0] += 5.0  # changed in place: the cached weights are not reused
        assert not torch.equal(model.displacement_field(z, moved)[:, 0], field[:, 0])
        _, idx = model.field_neighbours(pts.numpy())
        near = own[:, torch.as_tensor(idx[:, :-1])]                                   # (B, P, K, 3)
        assert bool((field >= near.amin(2) - 1e-4).all() and (field <= near.amax(2) + 1e-4).all())
        # continuous: a point moved by 0.01 Å moves the field by little next to the spread of its neighbours
        step = model.displacement_field(z, pts + 0.01)
        spread = (near.amax(2) - near.amin(2)).amax(-1)
        assert float(((step - field).norm(dim=-1) / spread).max()) < 0.05
    assert field.shape == (4, 500, 3)


def test_gaussians_fitted_to_the_consensus_reproduce_it(data: dict) -> None:
    """Pseudo-atoms of the consensus map with amplitudes fitted to it: the untrained model (z = 0) renders the
    map (correlation > 0.99, FSC 0.5 finer than 1.1 × the resolution)."""
    vol, _ = read_map(data["map"])
    thr = 0.1 * float(vol.max())
    fit = place_pseudo_atoms(vol, APIX, thr, 400, data["map"])
    rel = fit.atoms.xyz_A - box_centre_A(BOX, APIX)
    target = vol * (vol > 0.02 * vol.max())
    amps, fitted, info = fit_amplitudes(rel, target, APIX, RES, torch.device("cpu"))
    assert info["converged"] and (amps >= 0).all()
    fit.atoms.weight = amps
    model = GaussianMixture(fit.atoms, BOX, APIX, RES, zdim=2, spacing_A=spacing_A(fit.atoms.xyz_A))
    at_zero = model.volumes(np.zeros((1, 2)))[0]
    np.testing.assert_allclose(at_zero, fitted, atol=1e-4 * float(np.abs(fitted).max()))
    r = np.corrcoef(at_zero.ravel(), target.ravel())[0, 1]
    res = resolution_at(fsc(at_zero, target), BOX, APIX, 0.5)
    print(f"z = 0 model against the consensus: correlation {r:.4f}, FSC 0.5 at {res:.2f} Å")
    assert r > 0.99 and res < 1.1 * RES


# ------------------------------------------------------------------------------------------- training


def test_latent_maps_and_halfset_error_on_the_hinge(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "8", "--n_gaussians", "500", "--n_clusters", "4") == 0
    z = np.load(out / "z.npy").astype(np.float64)
    rho = abs(spearmanr(pca(z, 1).transform(z)[:, 0], data["tau"])[0])
    model = load_volume_model(out)
    assert isinstance(model, GaussianMixture) and len(model.atoms) == 500
    # maps at the latents of particles at both ends of the motion against their true maps
    sel = np.r_[np.flatnonzero(data["tau"] < 0.15)[:8], np.flatnonzero(data["tau"] > 0.85)[:8]]
    consensus = read_map(data["map"])[0]
    ours, base = [], []
    for vol, s in zip(model.volumes(z[sel]), data["state"][sel], strict=True):
        true = read_map(data["dir"] / "maps" / f"state_{s:03d}.mrc")[0]
        ours.append(fsc_auc(fsc(vol, true)))
        base.append(fsc_auc(fsc(consensus, true)))
    # half-set error per Gaussian: on the static core (true motion < 1 Å) against the LID (> 5 Å)
    _, near = cKDTree(data["ca"][10]).query(model.atoms.xyz_A)
    motion = np.linalg.norm(data["ca"][-1] - data["ca"][0], axis=1)[near]
    g_err = np.load(out / "gaussian_error.npy")
    static, moving = float(np.median(g_err[motion < 1])), float(np.median(g_err[motion > 5]))
    report = json.loads((out / "gmm_fit.json").read_text())
    print(f"|Spearman| {rho:.3f}; FSC AUC to the true maps {np.mean(ours):.3f} (consensus {np.mean(base):.3f}); "
          f"half-set error static {static:.2f} Å, moving {moving:.2f} Å; consensus fit {report['consensus_fit']}")
    assert rho > MIN_SPEARMAN
    assert np.mean(ours) > np.mean(base) + 0.03
    assert moving > 3 * static and static < 1.0
    assert report["consensus_fit"]["correlation"] > 0.99
    assert report["collapsed"] == [] and set(report["latent_kl"]) == {"all", "half1", "half2"}
    # outputs: per-particle error in the STAR, maps and models along PCs, the record's kinds
    err = np.load(out / "deformation_error.npy")
    star = load_particles(out / "particles.star", require_poses=False).table
    np.testing.assert_allclose(star["cryohetDeformErrorA"].to_numpy(), err, rtol=1e-5)
    assert err.shape == (600,) and report["halfsets"]["error_A"]["median"] == pytest.approx(np.median(err))
    kinds = {o.kind for o in read_record(out).outputs}
    assert {"model", "latents", "particles_star", "volume_series", "atomic_model", "chimerax", "plot",
            "report"} <= kinds
    disp = np.load(out / "pc1" / "displacements.npy")
    assert disp.shape == (4, 500, 3)
    ends = model.frames_A(np.loadtxt(out / "pc1" / "z_values.txt")[[0, -1]])
    np.testing.assert_allclose(disp[-1] - disp[0], ends[1] - ends[0], atol=1e-3)
    assert [t["epoch"] for t in report["terms"]] == list(range(1, 9))


def test_resume_with_gaussians_on_an_atomic_model(data: dict, tmp_path: Path) -> None:
    """A run stopped after one epoch of the model of all particles and resumed gives the uninterrupted run's
    latents, half-set latents and errors (the half models start from the finished model's encoder)."""
    base = ["--model", str(data["ref"]), "--n_clusters", "0", "--batch_size", "32"]
    assert _train(data, tmp_path / "full", "--epochs", "2", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "1", "--halfsets", "no", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "2", "--resume", "yes", "--overwrite", "yes", *base) == 0
    for name in ("z.npy", "half1_z.npy", "half2_z.npy", "deformation_error.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "cut" / name), np.load(tmp_path / "full" / name), atol=1e-5)
    report = json.loads((tmp_path / "cut" / "gmm_fit.json").read_text())
    assert report["support"]["rule"] == "one per residue of --model" and report["model"]["n_atoms"] == 214
    assert len(report["terms"]) == 2


def test_bad_inputs_are_refused_by_name(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vol, _ = read_map(data["map"])
    write_map(tmp_path / "small.mrc", vol[:16, :16, :16].copy(), APIX)
    write_map(tmp_path / "apix.mrc", vol, 2.0)
    corner = np.zeros_like(vol)
    corner[:6, :6, :6] = 1.0
    write_map(tmp_path / "corner.mrc", corner, APIX)
    cases = {
        "a": (["--consensus_map", str(tmp_path / "small.mrc")], "small.mrc", "box is 32"),
        "b": (["--consensus_map", str(tmp_path / "apix.mrc")], "apix.mrc", "Å/px"),
        "c": (["--mask", str(tmp_path / "corner.mrc")], "corner.mrc", "excludes the particle"),
        "d": (["--n_gaussians", "30000", "--batch_size", "100000"], "map.mrc", "enough for"),
    }
    for d, (args, name, words) in cases.items():
        assert _train(data, tmp_path / d, *args) == 2
        err = capsys.readouterr().err
        assert name in err and words in err, err
        assert not any((tmp_path / d).glob("*.npy")) and not (tmp_path / d / "model.safetensors").exists()
        assert not (tmp_path / d / "checkpoint.safetensors").exists()
