"""Splatting projector against the analytic slices; deformation-corrected reconstruction against the truth.

Ground truth: the simulator's hinge motion (``simulate.atomic_truth.hinge_truth``) with its true displacement
field (``simulate.deformation_truth``) as a DeformationModel (``models.hinge_truth``) and the true τ as latents.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryohet.cli import main
from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.splat import splat_slices
from cryohet.io.atomic_model import read_atoms
from cryohet.io.mrc import read_map, write_map
from cryohet.io.particles import load_particles
from cryohet.methods._deformed_inputs import check_memory
from cryohet.models.atomic_decoder import AtomicDecoder
from cryohet.models.displaced_atoms import DisplacedAtoms
from cryohet.models.hinge_truth import HingeTruthModel, write_run
from cryohet.models.maps import MapsModel
from cryohet.reconstruct.deformed import reconstruct_deformed
from cryohet.reconstruct.fsc import fsc, fsc_auc
from cryohet.record import Output, read_record
from cryohet.simulate.atomic_truth import hinge_truth
from cryohet.simulate.deformation_truth import hinge_field
from cryohet.simulate.molecules import DEFAULT_MOLECULE
from cryohet.simulate.simulate import simulate_particles

BOX, APIX, RES_A = 40, 2.5, 5.0


def _complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[..., 0].double(), x[..., 1].double())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.conj() * b).real.sum() / (a.abs().pow(2).sum() * b.abs().pow(2).sum()).sqrt())


@pytest.mark.parametrize("per_image", [False, True])
def test_splat_matches_analytic_slices(per_image):
    """Per shell below the resolution: correlation >= 0.999 and amplitude within 1 % of the analytic slices;
    gradients in positions and weights follow the analytic ones."""
    box, apix, res = 48, 2.0, 6.0
    rng = np.random.default_rng(3)
    A = torch.as_tensor(euler_to_matrix(random_euler(6, rng)), dtype=torch.float32)
    xyz = torch.as_tensor(rng.normal(0, 12, (1500, 3)), dtype=torch.float32)
    if per_image:
        xyz = xyz + torch.as_tensor(rng.normal(0, 2, (6, 1500, 3)), dtype=torch.float32)
    w = torch.as_tensor(rng.uniform(0.5, 1.5, 1500), dtype=torch.float32)
    pts = Lattice(box, apix).half_plane(box * apix / res)
    sigma = SIGMA_PER_RESOLUTION * res
    ref = gaussian_slices(A, xyz, w, sigma, pts.kxy, apix, box=box, lowpass_A=res)
    out = splat_slices(A, xyz, w, sigma, pts.kxy, apix, box=box, lowpass_A=res)
    assert out.shape == ref.shape and out.dtype == torch.float32
    r, o = _complex(ref), _complex(out)
    for s in range(1, int(pts.shell.max()) + 1):
        k = pts.shell == s
        assert _corr(r[:, k], o[:, k]) > 0.999, s
        assert abs(float(o[:, k].abs().pow(2).sum().sqrt() / r[:, k].abs().pow(2).sum().sqrt()) - 1) < 0.01, s

    x = (xyz if per_image else xyz[None].expand(6, -1, -1)).clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    g = torch.as_tensor(rng.normal(size=ref.shape), dtype=torch.float32)
    grads = []
    for project in (gaussian_slices, splat_slices):
        x.grad = wg.grad = None
        (project(A, x, wg, sigma, pts.kxy, apix, box=box, lowpass_A=res) * g).sum().backward()
        grads.append((x.grad.clone(), wg.grad.clone()))
    (ga, gwa), (gs, gws) = grads
    assert float((ga * gs).sum() / (ga.norm() * gs.norm())) > 0.97
    assert abs(float(gs.norm() / ga.norm()) - 1) < 0.05
    assert float((gwa * gws).sum() / (gwa.norm() * gws.norm())) > 0.999


def test_displaced_atoms_projector_choice():
    """A model's slices by the analytic sum and by splatting agree; auto splats above the work threshold."""
    atoms = read_atoms(DEFAULT_MOLECULE, "ca")
    atoms.xyz_A[:] += 32 * 2.0 - atoms.xyz_A.mean(0)
    model = AtomicDecoder(atoms, 64, 2.0, 8.0, zdim=2)
    pts = Lattice(64, 2.0).half_plane(64 * 2.0 / 8.0)
    rot = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(0))), dtype=torch.float32)
    z = torch.zeros(4, 2)
    slices = {}
    for p in ("analytic", "splat", "auto"):
        model.projector = p
        slices[p] = _complex(model.slices(rot, z, pts.kxy).detach())
    assert _corr(slices["analytic"], slices["splat"]) > 0.9999
    assert torch.equal(slices["auto"], slices["splat"])   # N·M = 214 × 704 is above SPLAT_MIN_WORK
    with pytest.raises(ValueError, match="projector"):
        DisplacedAtoms(atoms, 64, 2.0, 8.0, projector="fast")


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    """1000 particles of the LID hinge (10 states, 0-90°, SNR 0.1), the truth model and its run folder."""
    root = tmp_path_factory.mktemp("hinge")
    truth = hinge_truth(n_states=10, max_angle_deg=90.0, box=BOX, apix=APIX, resolution_A=RES_A)
    sim = simulate_particles(truth.conf, root / "sim", 1000, snr=0.1, seed=1, write_maps=False)
    pset = load_particles(sim.particles_star)
    tau = pset.table["cryohetTrueTau1"].to_numpy()[:, None].astype(np.float32)
    model = HingeTruthModel(hinge_field(truth), truth.heavy.weight, BOX, APIX, RES_A)
    run = root / "truth_run"
    write_run(run, model, pset, tau)
    return truth, pset, tau, model, run


def test_hinge_field_is_the_simulated_motion(hinge):
    """The field moves the LID's atoms as the simulator does (times the mask, above 0.95 deep inside it), leaves
    the core's (mask below 0.05) nearly still and is zero at τ = 0; the truth model's maps are the simulator's."""
    truth, _, _, model, _ = hinge
    f = model.field
    x = torch.as_tensor(f.atoms_A, dtype=torch.float32)
    d = model.displacement_field(torch.tensor([[0.0], [1.0]]), x).double().numpy()
    assert np.abs(d[0]).max() < 1e-5
    moved = truth.hinge.apply(truth.heavy.xyz_A, truth.max_angle_deg) - truth.heavy.xyz_A
    m = f.mask(f.atoms_A)
    assert (m[f.moving] > 0.5).all() and (m[~f.moving] < 0.5).all()
    deep = m > 0.95
    assert deep[f.moving].mean() > 0.6 and not deep[~f.moving].any()
    np.testing.assert_allclose(d[1][deep], moved[deep] * m[deep, None], atol=1e-3)
    assert np.abs(d[1][m < 0.05]).max() < 0.05 * np.abs(moved).max()
    vols = model.volumes(np.array([[0.0], [1.0]]))
    for v, ref in zip(vols, truth.conf.maps[[0, -1]]):
        assert np.corrcoef(v.ravel(), ref.ravel())[0, 1] > 0.9999


def test_zero_deformation_is_the_homogeneous_reconstruction(hinge):
    """With zero displacements the corrected map is the homogeneous reconstruction of the same images."""
    _, pset, tau, _, _ = hinge
    half = pset.table["rlnRandomSubset"].to_numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the CLI's --threads 1: the test machine's cores are shared
    try:
        zero = reconstruct_deformed(pset, tau, half, lambda z, x: torch.zeros(len(z), len(x), 3), 128,
                                    torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    c, h = zero.corrected.full, zero.homogeneous.full
    assert np.corrcoef(c.numpy().ravel(), h.numpy().ravel())[0, 1] > 0.99
    assert float((c * h).sum() / (h * h).sum()) == pytest.approx(1, abs=0.05)
    signal = zero.homogeneous.fsc >= 0.5   # the shells with signal (noise differs where there is none)
    assert signal[:8].all() and (fsc(c, h)[signal] > 0.97).all()
    assert np.abs(zero.corrected.fsc - zero.homogeneous.fsc)[signal].max() < 0.05


def test_corrected_map_beats_homogeneous(hinge, tmp_path):
    """``cryohet reconstruct-deformed --run`` on the truth model's run folder (true field, true τ): the corrected
    map is closer to the true canonical map (τ = 0) than the homogeneous reconstruction of the same particles,
    and its half-map resolution is better; maps and both FSC curves recorded."""
    truth, _, _, _, run = hinge
    out = tmp_path / "rd"
    assert main(["reconstruct-deformed", "--run", str(run), "--o", str(out), "--threads", "1"]) == 0
    rec = read_record(out)
    fscs = {o.label: o.meta["resolution_A"] for o in rec.of_kind("fsc")}
    res_c = fscs["half-map FSC, deformation-corrected"]
    res_h = fscs["half-map FSC, homogeneous"]
    assert res_c < res_h - 0.5   # 6.7 Å and 7.9 Å
    corrected, apix = read_map(out / "map.mrc")
    homogeneous, _ = read_map(out / "homogeneous.mrc")
    assert apix == pytest.approx(APIX) and corrected.shape == (BOX,) * 3
    canonical = truth.conf.maps[0]
    auc_c, auc_h = fsc_auc(fsc(corrected, canonical)), fsc_auc(fsc(homogeneous, canonical))
    print(f"FSC area to the canonical map: corrected {auc_c:.3f}, homogeneous {auc_h:.3f}; "
          f"half-map resolution {res_c:.2f}, {res_h:.2f} Å")
    # 0.611 and 0.568 (the homogeneous map is divided as relion_reconstruct's since one Wiener division: it was 0.556)
    assert auc_c > auc_h + 0.02
    assert len(rec.of_kind("volume")) == 2 and rec.of_kind("plot")
    halves = {h.path: h.meta["of"] for h in rec.of_kind("half_map")}  # each volume's halves named
    assert halves == {"half1.mrc": "map.mrc", "half2.mrc": "map.mrc", "homogeneous_half1.mrc": "homogeneous.mrc",
                      "homogeneous_half2.mrc": "homogeneous.mrc"}


def test_bad_inputs(hinge, tmp_path):
    """A model without a displacement field, latents of other particles, a box the device cannot hold:
    InputError naming the file, nothing written."""
    truth, pset, tau, _, run = hinge
    maps_run = tmp_path / "maps_run"
    maps_run.mkdir()
    paths = []
    for i in (0, 9):
        paths.append(maps_run / f"state_{i}.mrc")
        write_map(paths[-1], truth.conf.maps[i], APIX)
    write_run(maps_run, HingeTruthModel.load(run / "model.safetensors"), pset, tau)
    MapsModel(paths, truth.conf.tau[[0, 9]]).save(maps_run / "maps.json")
    rec = read_record(maps_run)
    rec.outputs[0] = Output("model", "maps.json", "two true maps", {"model_type": "maps"})
    rec.write(maps_run)
    out = tmp_path / "o1"
    assert main(["reconstruct-deformed", "--run", str(maps_run), "--o", str(out)]) == 2
    assert json.loads((out / "cryohet_run.json").read_text())["error"].count("no displacement field") == 1
    assert not list(out.glob("*.mrc"))

    short = tmp_path / "short_run"
    write_run(short, HingeTruthModel.load(run / "model.safetensors"), pset, tau)
    np.save(short / "latents.npy", tau[:-1])
    out = tmp_path / "o2"
    assert main(["reconstruct-deformed", "--run", str(short), "--o", str(out)]) == 2
    err = json.loads((out / "cryohet_run.json").read_text())["error"]
    assert "latents.npy" in err and "do not match the 1000 particles" in err
    assert not list(out.glob("*.mrc"))

    with pytest.raises(InputError, match=r"box 4096 needs .* enough for box \d+: use --box") as exc:
        check_memory(4096, 64, 16384, torch.device("cpu"), run / "particles.star")
    assert "particles.star" in str(exc.value)
