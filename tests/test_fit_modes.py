"""fit-modes: analytic Gaussian-atom slices against the Projector of the rendered map and against relion_project;
recovery of known normal-mode amplitudes (ProDy ANM modes) by the direct and the amortised fit, noiseless and
noisy; pose correction; resume of both fits; the CLI end to end; every kind of bad input."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from relion_tools import pose_ctf_star

from cryohet.cli import main
from cryohet.data.prepare import ImagePreparer, transform_rms
from cryohet.errors import InputError, RunAborted
from cryohet.geometry.ctf import ctf_2d
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.fourier import ifft2c
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION, gaussian_map
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.geometry.shift import apply_origin
from cryohet.inference.mode_amortised import fit_amortised
from cryohet.inference.mode_fit import DirectOptions, estimate_scale, fit_direct
from cryohet.inference.trainer import Hooks, TrainOptions
from cryohet.io.atomic_model import read_atoms
from cryohet.io.mrc import write_map
from cryohet.io.normal_modes import read_normal_modes, write_normal_modes
from cryohet.io.particles import load_particles
from cryohet.io.star import read_star, write_star
from cryohet.models.base import load_volume_model
from cryohet.models.elastic_network import anm_modes
from cryohet.models.modes import ModeModel
from cryohet.record import RunRecord, read_record
from cryohet.simulate import simulate_particles
from cryohet.simulate.modes import draw_amplitudes, mode_conformations, place_in_box
from cryohet.simulate.molecules import DEFAULT_MOLECULE

BOX, APIX, RES = 32, 3.0, 8.0
SIGMA_A = np.array([3.0, 2.0, 2.0])  # amplitude spread of modes 1-3, Å RMS
#: the smallest correlation per mode between fitted and true amplitudes; measured (200 particles, 40 Adam steps):
#: direct noiseless 0.999/0.986/0.992, SNR 1 0.988/0.975/0.976, SNR 0.3 0.974/0.922/0.908; amortised noiseless
#: (1000 particles, 30 epochs) 0.994/0.990/0.992. Thresholds leave room for other draws.
MIN_CC = {None: 0.95, 1.0: 0.93, 0.3: 0.85}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The library-level fits here run in this process: one torch thread, as the CLI runs get --threads 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """modes.npz of the bundled molecule's Cα (ProDy ANM, 6 modes) placed in the box, and 200 particles of 150
    states drawn along modes 1-3, noiseless and at SNR 1 and 0.3 (the same draws)."""
    d = tmp_path_factory.mktemp("modes")
    atoms = place_in_box(read_atoms(DEFAULT_MOLECULE, "ca"), BOX, APIX)
    nm = anm_modes(atoms, 6, selection="ca", solver="torch")  # equal to ProDy's (tests/test_nma.py)
    modes = nm.modes
    write_normal_modes(d / "modes.npz", nm)
    amp = draw_amplitudes(150, SIGMA_A, np.random.default_rng(1))
    conf = mode_conformations(atoms, modes[:3], amp, BOX, APIX, RES)
    out = {"dir": d, "modes": d / "modes.npz", "atoms": atoms, "eigvecs": modes}
    for snr in (None, 1.0, 0.3):
        sim = simulate_particles(conf, d / f"snr_{snr}", 200, snr, seed=0, write_maps=snr is None)
        out[snr] = sim.particles_star
        out["truth"] = np.load(sim.ground_truth)["tau"]
    out["map"] = d / "snr_None" / "maps" / "mean.mrc"
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(b.shape[1])])


# ------------------------------------------------------------------------------------ Gaussian slices


def test_gaussian_slices_are_the_projector_slices_of_the_rendered_map() -> None:
    atoms = place_in_box(read_atoms(DEFAULT_MOLECULE, "ca"), BOX, APIX)
    rel = atoms.xyz_A - (BOX // 2) * APIX
    vol = gaussian_map(rel, atoms.weight, BOX, APIX, RES, np.zeros(3))
    pts = Lattice(BOX, APIX).half_plane(BOX * APIX / RES)
    A = torch.as_tensor(euler_to_matrix(random_euler(16, np.random.default_rng(0))), dtype=torch.float32)
    ref = torch.view_as_real(Projector(torch.as_tensor(vol)).slice_points(A, pts.kxy)).double()
    xyz, w = torch.as_tensor(rel), torch.as_tensor(atoms.weight)
    ours = gaussian_slices(A.double(), xyz, w, SIGMA_PER_RESOLUTION * RES, pts.kxy.double(), APIX, box=BOX,
                           lowpass_A=RES, chunk_atoms=50)
    for lo in (0, 4, 8):  # shells of 4 px up to the resolution (12 px)
        m = (pts.shell >= lo) & (pts.shell < lo + 4)
        a, b = ref[:, m].flatten(), ours[:, m].flatten()
        cc, scale = float(a @ b / a.norm() / b.norm()), float(a @ b / (b @ b))
        assert cc > 0.999 and abs(scale - 1) < 0.01, (lo, cc, scale)
    per_image = gaussian_slices(A.double(), xyz.expand(16, -1, -1), w, SIGMA_PER_RESOLUTION * RES,
                                pts.kxy.double(), APIX, box=BOX, lowpass_A=RES)
    torch.testing.assert_close(per_image, ours)
    xyz.requires_grad_(True)
    gaussian_slices(A.double(), xyz, w, 2.0, pts.kxy.double(), APIX).square().sum().backward()
    assert torch.isfinite(xyz.grad).all() and xyz.grad.abs().sum() > 0


@pytest.mark.parametrize("per_image", [False, True])
def test_gaussian_slices_gradients_match_finite_differences(per_image: bool) -> None:
    """The hand-written backward pass (positions, rotations, weights) against torch's numerical gradients."""
    g = torch.Generator().manual_seed(1)
    A = torch.as_tensor(euler_to_matrix(random_euler(3, np.random.default_rng(1)))).requires_grad_(True)
    xyz = (torch.randn(*((3,) if per_image else ()), 5, 3, generator=g, dtype=torch.float64) * 10).requires_grad_()
    w = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_(True)
    kxy = torch.rand(7, 2, generator=g, dtype=torch.float64) - 0.5
    assert torch.autograd.gradcheck(lambda a, x, ww: gaussian_slices(a, x, ww, 1.5, kxy, 2.0, chunk_atoms=2),
                                    (A, xyz, w))


def test_gaussian_images_match_relion_project(tmp_path: Path) -> None:
    """Images from the analytic slices (CTF, origins) against relion_project --ctf of the rendered map."""
    atoms = place_in_box(read_atoms(DEFAULT_MOLECULE, "ca"), BOX, APIX)
    rel = atoms.xyz_A - (BOX // 2) * APIX
    write_map(tmp_path / "map.mrc", gaussian_map(rel, atoms.weight, BOX, APIX, RES, np.zeros(3)), APIX)
    pose_ctf_star(tmp_path / "angles.star", 12, BOX, APIX, seed=4, shift_sigma_A=3.0)
    res = subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "angles.star", "--o", "proj", "--ctf"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with mrcfile.open(tmp_path / "proj.mrcs") as m:
        relion = m.data.astype(np.float64)
    ps = load_particles(tmp_path / "proj.star")
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    ky, kx = torch.meshgrid(c, c, indexing="ij")
    kxy = torch.stack([kx.flatten(), ky.flatten()], 1) / BOX
    A = torch.as_tensor(euler_to_matrix(ps.euler_deg))
    F = torch.view_as_complex(gaussian_slices(A, torch.as_tensor(rel), torch.as_tensor(atoms.weight),
                                              SIGMA_PER_RESOLUTION * RES, kxy, APIX, box=BOX, lowpass_A=RES)
                              .contiguous()).reshape(-1, BOX, BOX)
    F = F * ctf_2d(ps.ctf, BOX, APIX).to(F.real.dtype)
    ours = ifft2c(apply_origin(F, torch.as_tensor(ps.shift_A / APIX))).real.numpy()
    for a, b in zip(ours, relion, strict=True):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
        assert abs(float(a.ravel() @ b.ravel() / (a.ravel() @ a.ravel())) - 1) < 0.03


def test_the_model_slices_are_the_transforms_of_its_maps(data: dict) -> None:
    nm = read_normal_modes(data["modes"])
    model = ModeModel(nm.atoms, nm.modes[:2], [1, 2], BOX, APIX, RES, scale=0.5)
    z = np.array([[2.0, -1.5]])
    vol = model.volumes(z)[0]
    pts = Lattice(BOX, APIX).half_plane(BOX * APIX / RES)
    A = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(2))), dtype=torch.float32)
    ref = torch.view_as_real(Projector(torch.as_tensor(vol)).slice_points(A, pts.kxy))
    with torch.no_grad():
        ours = model.slices(A, torch.as_tensor(z, dtype=torch.float32).expand(4, -1), pts.kxy)
    assert float((ref * ours).sum() / ref.norm() / ours.norm()) > 0.999
    # amplitudes are Å of RMS displacement over the atoms
    frames = model.frames_A(z)[0]
    assert np.sqrt(((frames - nm.atoms.xyz_A) ** 2).sum(1).mean()) == pytest.approx(np.hypot(2.0, 1.5), rel=1e-5)


# ------------------------------------------------------------------------------------ fits


def _prepared(star: Path, model: ModeModel) -> tuple:
    pset = load_particles(star)
    lat = Lattice(BOX, APIX)
    prep = ImagePreparer(pset, lat, lat.half_plane(BOX * APIX / RES))
    reader = pset.reader()
    prep.scale = model.data_scale = transform_rms(reader, prep, 1000, 0)
    model.log_scale.data.fill_(float(np.log(estimate_scale(model, reader, prep, torch.device("cpu")))))
    return reader, prep


@pytest.mark.parametrize("snr", [None, 1.0, 0.3])
def test_direct_fit_recovers_the_true_amplitudes(data: dict, snr: float | None, tmp_path: Path) -> None:
    nm = read_normal_modes(data["modes"])
    model = ModeModel(nm.atoms, nm.modes[:3], [1, 2, 3], BOX, APIX, RES)
    reader, prep = _prepared(data[snr], model)
    res = fit_direct(model, reader, prep, DirectOptions(iterations=40), tmp_path, torch.device("cpu"), Hooks())
    cc = _corr(res.amplitudes_A, data["truth"])
    print(f"direct fit, SNR {snr}: correlation per mode {np.round(cc, 3)}")
    assert (cc > MIN_CC[snr]).all(), cc


class _AbortAfter:
    """Hooks whose abort check fires after ``n`` calls (a run killed mid-way, between two chunks)."""

    def __init__(self, n: int):
        self.n, self.log, self.progress = n, Hooks().log, Hooks().progress

    def check_abort(self) -> None:
        self.n -= 1
        if self.n < 0:
            raise RunAborted("test")


def test_direct_fit_resumes_from_its_chunk_checkpoint(data: dict, tmp_path: Path) -> None:
    nm = read_normal_modes(data["modes"])
    model = ModeModel(nm.atoms, nm.modes[:2], [1, 2], BOX, APIX, RES)
    reader, prep = _prepared(data[1.0], model)
    opts = DirectOptions(iterations=5, batch_size=16, chunk_images=64)
    full = fit_direct(model, reader, prep, opts, tmp_path / "a", torch.device("cpu"), Hooks())
    with pytest.raises(RunAborted):  # killed in the third chunk: two are in the checkpoint
        fit_direct(model, reader, prep, opts, tmp_path / "b", torch.device("cpu"), _AbortAfter(9))
    done = np.load(tmp_path / "b" / "direct_checkpoint.npz")["done"]
    assert done.sum() == 128
    resumed = fit_direct(model, reader, prep, opts, tmp_path / "b", torch.device("cpu"), _AbortAfter(5), resume=True)
    np.testing.assert_allclose(resumed.amplitudes_A, full.amplitudes_A, atol=1e-5)
    with pytest.raises(InputError, match="other settings"):
        fit_direct(model, reader, prep, dataclasses.replace(opts, iterations=11), tmp_path / "b",
                   torch.device("cpu"), Hooks(), resume=True)


def test_amortised_fit_recovers_the_amplitudes_and_resumes(data: dict, tmp_path: Path) -> None:
    nm = read_normal_modes(data["modes"])
    model = ModeModel(nm.atoms, nm.modes[:3], [1, 2, 3], BOX, APIX, RES)
    reader, prep = _prepared(data[None], model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opts = TrainOptions(epochs=25, batch_size=16, lr=1e-3, amp="no")
    _, res = fit_amortised(model, reader, prep, opts, 2, 128, 0.01, tmp_path / "full", torch.device("cpu"), Hooks())
    cc = _corr(res.z_mu, data["truth"])
    print(f"amortised fit, noiseless, 200 particles: correlation per mode {np.round(cc, 3)}")
    assert (cc > 0.9).all(), cc
    # 2 epochs, then resumed to 3, equals 3 at once
    runs = {}
    for name, steps in (("once", [3]), ("twice", [2, 3])):
        for i, ep in enumerate(steps):
            model.load_state_dict(state)
            _, runs[name] = fit_amortised(model, reader, prep, dataclasses.replace(opts, epochs=ep), 2, 64, 0.01,
                                          tmp_path / name, torch.device("cpu"), Hooks(), resume=i > 0)
    assert runs["twice"].start_epoch == 3
    np.testing.assert_allclose(runs["twice"].z_mu, runs["once"].z_mu, atol=1e-5)


# ------------------------------------------------------------------------------------ the method


def _perturbed_star(src: Path, dst: Path, deg: float, shift_A: float) -> np.ndarray:
    """A copy of ``src`` with poses rotated by ``deg`` about random axes and origins moved by ``shift_A``."""
    from scipy.spatial.transform import Rotation

    tables = read_star(src)
    p = tables["particles"]
    rng = np.random.default_rng(5)
    e = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    axes = rng.normal(size=(len(p), 3))
    R = Rotation.from_rotvec(np.deg2rad(deg) * axes / np.linalg.norm(axes, axis=1, keepdims=True)).as_matrix()
    from cryohet.geometry.euler import matrix_to_euler

    p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = matrix_to_euler(R @ euler_to_matrix(e))
    p[["rlnOriginXAngst", "rlnOriginYAngst"]] += rng.normal(0, shift_A, (len(p), 2))
    p["rlnImageName"] = [f"{n.split('@')[0]}@{(src.parent / n.split('@')[1]).resolve()}" for n in p["rlnImageName"]]
    write_star(dst, tables)
    return e


def _angle_deg(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    R = euler_to_matrix(e1) @ np.swapaxes(euler_to_matrix(e2), 1, 2)
    return np.degrees(np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def test_cli_direct_with_pose_correction_end_to_end(data: dict, tmp_path: Path) -> None:
    star = tmp_path / "perturbed.star"
    true_e = _perturbed_star(data[None], star, 4.0, 1.5)
    out = tmp_path / "run"
    code = main(["fit-modes", "--particles", str(star), "--modes", str(data["modes"]), "--modes_used", "1-3",
                 "--pose_correction", "yes", "--reference_map", str(data["map"]), "--iterations", "60",
                 "--o", str(out), "--threads", "1"])
    assert code == 0
    rec = read_record(out)
    assert {o.kind for o in rec.outputs} == {"model", "latents", "particles_star", "plot", "atomic_model"}
    z = np.load(out / "amplitudes.npy")
    assert z.shape == (200, 3)
    cc = _corr(z, data["truth"])
    before = _angle_deg(read_star(star)["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
                        true_e)
    after_t = read_star(out / "particles.star")["particles"]
    after = _angle_deg(after_t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), true_e)
    print(f"pose correction: angular error {np.median(before):.2f} -> {np.median(after):.2f} deg (median); "
          f"amplitude correlation {np.round(cc, 3)}")
    assert np.median(after) < 0.5 * np.median(before)
    assert (cc > 0.9).all(), cc
    np.testing.assert_allclose(after_t[[f"cryohetZ{i}" for i in (1, 2, 3)]].to_numpy(), z, atol=1e-4)
    # the volume model, analysis and the atomic models along each mode
    model = load_volume_model(out)
    assert model.latent_dim == 3 and model.volumes(np.zeros((1, 3))).shape == (1, BOX, BOX, BOX)
    frames = read_atoms(out / "mode_1.pdb", "ca")  # first model: the 5th percentile of mode 1
    lo = np.percentile(z[:, 0], 5)
    expected = data["atoms"].xyz_A + lo * np.sqrt(len(frames)) * data["eigvecs"][0]
    np.testing.assert_allclose(frames.xyz_A, expected, atol=2e-3)


def _nma_like_run(data: dict, folder: Path) -> Path:
    """A run folder as ``cryohet nma`` leaves it: a mode table and modes.npz, both of kind normal_modes."""
    folder.mkdir()
    shutil.copy(data["modes"], folder / "modes.npz")
    (folder / "modes.csv").write_text("mode,eigenvalue\n")
    rec = RunRecord("nma", {}, status="finished")
    for name in ("modes.csv", "modes.npz"):
        rec.add("normal_modes", name, folder)
    rec.write(folder)
    return folder


def test_cli_amortised_end_to_end(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    nma_run = _nma_like_run(data, tmp_path / "nma")
    assert main(["fit-modes", "--particles", str(data[1.0]), "--modes", str(nma_run), "--modes_used", "1,2",
                 "--fit", "amortised", "--epochs", "3", "--enc_dim", "64", "--o", str(out), "--threads", "1"]) == 0
    assert np.load(out / "amplitudes.npy").shape == (200, 2)
    assert (out / "checkpoint.safetensors").is_file() and (out / "mode_2.pdb").is_file()
    assert main(["fit-modes", "--particles", str(data[1.0]), "--modes", str(data["modes"]), "--modes_used", "1,2",
                 "--fit", "amortised", "--epochs", "4", "--enc_dim", "64", "--o", str(out), "--threads", "1",
                 "--resume", "yes"]) == 0
    assert "resuming from" in (out / "run.log").read_text()


# ------------------------------------------------------------------------------------ bad input


def _modes_variant(data: dict, path: Path, **change: np.ndarray) -> Path:
    with np.load(data["modes"]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(change)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _fails(data: dict, out: Path, capsys: pytest.CaptureFixture, *args: str) -> str:
    code = main(["fit-modes", "--particles", str(data[1.0]), "--o", str(out), "--threads", "1", *args])
    err = capsys.readouterr().err
    assert code != 0
    assert not (out / "model.safetensors").exists() and not (out / "amplitudes.npy").exists()
    return err


def test_bad_inputs_are_refused_by_name(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    modes = str(data["modes"])
    err = _fails(data, tmp_path / "a", capsys, "--modes", modes, "--modes_used", "1-3,9")
    assert "modes.npz" in err and "mode(s) 9" in err and "holds 6 modes" in err
    far = _modes_variant(data, tmp_path / "far.npz", coords_A=data["atoms"].xyz_A + 80.0)
    err = _fails(data, tmp_path / "b", capsys, "--modes", str(far))
    assert "far.npz" in err and "outside the box" in err
    short = _modes_variant(data, tmp_path / "short.npz", weight=data["atoms"].weight[:-3])
    err = _fails(data, tmp_path / "c", capsys, "--modes", str(short))
    assert "short.npz" in err and "per-atom arrays" in err
    nomodes = _modes_variant(data, tmp_path / "nomodes.npz")
    with np.load(nomodes) as f:
        arrays = {k: f[k] for k in f.files if k != "modes"}
    np.savez(nomodes, **arrays)
    err = _fails(data, tmp_path / "d", capsys, "--modes", str(nomodes))
    assert "nomodes.npz" in err and "no modes" in err
    err = _fails(data, tmp_path / "e", capsys, "--modes", str(tmp_path / "missing.npz"))
    assert "missing.npz" in err and "not found" in err
    vol = mrcfile.read(data["map"])
    write_map(tmp_path / "mirror.mrc", np.roll(vol[::-1], 1, axis=0).copy(), APIX)  # z -> -z about the centre
    err = _fails(data, tmp_path / "f", capsys, "--modes", modes, "--reference_map", str(tmp_path / "mirror.mrc"))
    assert "modes.npz" in err and "mirror.mrc" in err and "hands" in err
    err = _fails(data, tmp_path / "g", capsys, "--modes", str(tmp_path / "a"))  # a run folder without nma output
    assert "holds no normal modes" in err
    err = _fails(data, tmp_path / "h", capsys, "--modes", modes, "--fit", "amortised", "--pose_correction", "yes")
    assert "--pose_correction" in err


def test_slices_keep_float32_under_mixed_precision(data: dict) -> None:
    """The trainer's autocast (bfloat16) must not reach the atoms' positions and phases."""
    nm = read_normal_modes(data["modes"])
    model = ModeModel(nm.atoms, nm.modes[:2], [1, 2], BOX, APIX, RES)
    pts = Lattice(BOX, APIX).half_plane(BOX * APIX / RES)
    A = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(3))), dtype=torch.float32)
    z = torch.tensor([[1.0, -2.0]]).expand(4, -1)
    with torch.no_grad():
        ref = model.slices(A, z, pts.kxy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.slices(A, z, pts.kxy)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ref)
