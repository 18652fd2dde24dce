"""Heterogeneous ab initio (cryohet abinit-het) on a simulated hinge whose poses are hidden: the pose re-search
against a decoder's slices finds the poses of images the decoder made, the method recovers poses (after aligning
frame and hand) and a latent that follows the true hinge angle, writes a model that the analysis tools read,
resumes a killed run to the same result, and refuses bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import kill_when, start

from cryohet.errors import InputError
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.lattice import Lattice
from cryohet.inference.decoder_poses import DecoderScorer
from cryohet.inference.pose_search import angle_between_deg, local_search, rotation_from_vector
from cryohet.io.particles import load_particles
from cryohet.io.star import read_star, write_star
from cryohet.methods.abinit_het import METHOD as ABINIT_HET
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.models.base import load_volume_model
from cryohet.runner import run_method
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import discrete_conformations
from cryohet.simulate.simulate import simulate_particles
from cryohet.validation.metrics import spearman_pc1
from cryohet.validation.poses import pose_errors

# long: make test runs this module in the pinned environment only (tests/conftest.py, one_stack)
pytestmark = pytest.mark.one_stack("pinned")

#: a small run: the consensus started from the true mean map (low-passed to 30 Å by the method; ab initio from a
#: random start is test_abinit.py's) with 4 global iterations and 2 local, networks of 128, one re-search
FAST = dict(global_iterations=4, global_subset=200, local_iterations=2, zdim=1, enc_dim=128, dec_dim=128, lr=1e-3,
            epochs=12, rounds=1, n_maps=2, threads=1)
#: a tiny one for the resume test
TINY = dict(global_iterations=4, local_iterations=0, global_subset=60, zdim=1, enc_dim=32, dec_dim=32, epochs=3,
            rounds=1, search_high_A=20.0, n_maps=2, threads=1)


@pytest.fixture(scope="module")
def hinge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 particles of the bundled molecule's hinge (20 states), box 32 at 4 Å/px, SNR 1."""
    out = tmp_path_factory.mktemp("hinge")
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=400, snr=1.0, n_states=20,
                              threads=1, seed=3), out)
    return out


@pytest.fixture(scope="module")
def solved(hinge: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("abinit_het")
    run_method(ABINIT_HET, {"particles": str(hinge / "particles.star"), "reference": str(hinge / "maps" / "mean.mrc"),
                            **FAST}, out)
    return out


def _errors(truth_star: Path, est_star: Path):
    truth, est = load_particles(truth_star), load_particles(est_star)
    return pose_errors(euler_to_matrix(est.euler_deg), est.shift_A, euler_to_matrix(truth.euler_deg), truth.shift_A)


class MovingAtoms(torch.nn.Module):
    """A conformational model with exact slices: 30 Gaussian atoms (σ 3 Å) whose first ten move by z (Å) along x
    (the analytic transforms of ``geometry.gaussian_slices``)."""

    def __init__(self, apix: float):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.apix, self.xyz = apix, torch.randn(30, 3, generator=g) * 15.0
        self.move = torch.zeros(30, 3)
        self.move[:10, 0] = 1.0

    def slices(self, rot: torch.Tensor, z: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        xyz = self.xyz[None] + z[:, :1, None] * self.move[None]
        return gaussian_slices(rot, xyz, torch.ones(30), 3.0, kxy, self.apix, voxel_integrated=False)


def test_decoder_search_finds_the_poses_of_images_the_decoder_made() -> None:
    """Noise-free images of a moving-atoms model at known latents, rotations and origins (with a CTF), searched
    from rotations 5° away and origins 1 px away: the local search against the model's slices at each image's
    latent returns the true rotations within 0.3° and the origins within 0.05 px (a residual under 0.1 % of the
    image's power), where the shape at z = 0 leaves more than 1 % even at the true pose."""
    g = torch.Generator().manual_seed(0)
    model = MovingAtoms(4.0)
    points = Lattice(32, 4.0).half_plane(8.0)
    B = 12
    z = torch.randn(B, 1, generator=g) * 8.0
    A_true = rotation_from_vector(torch.randn(B, 3, generator=g))
    s_true = torch.rand(B, 2, generator=g) * 2 - 1
    ctf = torch.cos(40 * (points.kxy ** 2).sum(-1))[None].expand(B, -1)
    scorer = DecoderScorer(model, z, points.kxy, chunk=1000)
    # an image whose origin is s shows the slice moved by s: undoing s brings it back (undo_origin's sign)
    phase = 2 * math.pi * s_true @ points.kxy.T
    images = scorer.slices(A_true[:, None])[:, 0] * ctf * torch.polar(torch.ones_like(phase), phase)
    axis = torch.nn.functional.normalize(torch.randn(B, 3, generator=g), dim=1)
    A0 = rotation_from_vector(axis * math.radians(5.0)) @ A_true
    s0 = s_true + torch.nn.functional.normalize(torch.randn(B, 2, generator=g), dim=1)
    found = local_search(scorer, images, ctf, A0, s0, max_angle_deg=8.0, max_shift_px=2.0, n_rounds=7)
    assert float(angle_between_deg(found.rotations, A_true).max()) < 0.3
    assert float((found.shifts_px - s_true).norm(dim=1).max()) < 0.05
    norm = (images.abs() ** 2).sum(1)
    assert float((-found.score / norm).max()) < 1e-3
    rigid = DecoderScorer(model, torch.zeros(B, 1), points.kxy)
    at_truth = rigid.score(images, ctf, A_true[:, None], s_true[:, None])[:, 0, 0]
    assert float((-at_truth / norm).median()) > 0.01  # measured 0.028


def test_abinit_het_recovers_poses_and_conformation(hinge: Path, solved: Path) -> None:
    """From images without poses: the final poses' median error (frame and hand aligned) is under 7° and at least
    0.2° below the consensus' (the re-search against the model at each image's latent corrects part of the
    consensus' error: measured 7.11° -> 6.58°, origins 0.80 -> 0.69 Å), and the latent's first PC follows the true
    hinge angle (|Spearman| above 0.3, measured 0.50; chance ~0.05 for 400 particles); the model is read by the analysis
    tools as train-vae's, the consensus maps, FSC and STAR files are written and the hand is reported undetermined."""
    final = _errors(hinge / "particles.star", solved / "particles.star")
    consensus = _errors(hinge / "particles.star", solved / "particles_consensus.star")
    print(f"median pose error: consensus {consensus.median_angle_deg:.2f}°, final {final.median_angle_deg:.2f}°; "
          f"origins {consensus.median_shift_A:.2f} / {final.median_shift_A:.2f} Å")
    assert final.median_angle_deg < 7.0 and final.median_shift_A < 1.2
    assert final.median_angle_deg < consensus.median_angle_deg - 0.2  # measured 7.11° -> 6.58°
    z = np.load(solved / "z.npy")
    rho = spearman_pc1(z, np.load(hinge / "ground_truth.npz")["tau"])
    print(f"|Spearman| of the latent's PC1 with the true hinge angle: {rho:.3f}")
    assert rho > 0.3
    star = read_star(solved / "particles.star")["particles"]
    assert {"cryohetZ1", "rlnAngleRot", "rlnOriginXAngst", "rlnRandomSubset"} <= set(star.columns)
    np.testing.assert_allclose(star["cryohetZ1"].to_numpy(), z[:, 0], rtol=1e-5, atol=1e-6)
    vm = load_volume_model(solved)
    assert vm.volumes(z[:2]).shape == (2, 32, 32, 32)
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.star", "history.png", "model.safetensors"):
        assert (solved / name).stat().st_size > 0
    assert len(list((solved / "pc1").glob("*.mrc"))) == 2
    assert "hand undetermined" in (solved / "cryohet_run.json").read_text()


def test_a_killed_run_resumes_to_the_same_result(hinge: Path, tmp_path: Path) -> None:
    """Killed during the training after the pose re-search and continued with --resume yes: the same poses and
    latents as an uninterrupted run; a resume with another setting is refused naming the state file."""
    tables = read_star(hinge / "particles.star")
    write_star(hinge / "particles_150.star", {"optics": tables["optics"], "particles": tables["particles"].iloc[:150]})
    values = {"particles": str(hinge / "particles_150.star"), **TINY}
    run_method(ABINIT_HET, values, tmp_path / "whole")
    out = tmp_path / "killed"
    code = ("from cryohet.runner import run_method\nfrom cryohet.methods.abinit_het import METHOD\n"
            f"run_method(METHOD, {values!r}, {str(out)!r})\n")
    kill_when(start(code), lambda: (out / "het_state.safetensors").exists(), 0.0)
    assert not (out / "z.npy").exists()
    run_method(ABINIT_HET, {**values, "resume": True}, out)
    a, b = (load_particles(d / "particles.star") for d in (tmp_path / "whole", out))
    np.testing.assert_allclose(a.euler_deg, b.euler_deg, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "whole" / "z.npy"), np.load(out / "z.npy"), atol=1e-5)
    log = (out / "run.log").read_text()
    assert "resuming after pose re-search 1 of 1" in log
    with pytest.raises(InputError, match=r"het_state\.safetensors.*other settings.*epochs"):
        run_method(ABINIT_HET, {**values, "epochs": 4, "resume": True}, out)


def test_bad_input_is_refused(hinge: Path, tmp_path: Path) -> None:
    """Particles without CTF, a band limit beyond Nyquist and a box below the search's 16 px: clear errors naming
    the file; nothing written but the run's record and log."""
    tables = read_star(hinge / "particles.star")
    parts = tables["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    write_star(tmp_path / "noctf.star", {"optics": tables["optics"], "particles": parts})
    with pytest.raises(InputError, match="noctf.star.*no CTF parameters"):
        run_method(ABINIT_HET, {"particles": str(tmp_path / "noctf.star"), "datadir": str(hinge)}, tmp_path / "a")
    with pytest.raises(InputError, match="particles.star.*beyond the images' Nyquist"):
        run_method(ABINIT_HET, {"particles": str(hinge / "particles.star"), "global_high_A": 6.0}, tmp_path / "b")
    small = discrete_conformations([default_molecule()], apix=16.0, box=8, resolution_A=32.0)
    sim_small = simulate_particles(small, tmp_path / "small", 20, 1.0, seed=1)
    with pytest.raises(InputError, match="particles.star.*8 px.*at least 16"):
        run_method(ABINIT_HET, {"particles": str(sim_small.particles_star)}, tmp_path / "c")
    for out in ("a", "b", "c"):
        assert {p.name for p in (tmp_path / out).iterdir()} <= {"cryohet_run.json", "run.log"}
