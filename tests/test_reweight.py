"""reweight: populations of trajectory frames from particles simulated from a known mixture of frames (adenylate
kinase open -> closed, uneven populations), the likelihood against a direct computation, the Gibbs sampler against
the Dirichlet posterior it must reproduce, DCD / XTC / multi-model PDB / mmCIF inputs, collective variables, the
free-energy profile, resume, the CLI, and every bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import MDAnalysis as mda
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from MDAnalysis.analysis import rms

from cryohet.analysis.collective import com_distance, cv_from_file, rmsd_to_frame
from cryohet.analysis.free_energy import free_energy_profile
from cryohet.errors import InputError
from cryohet.geometry.ctf import ctf_2d
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.fourier import fft2c
from cryohet.geometry.lattice import Lattice, crop_transforms
from cryohet.geometry.project import Projector, ProjectorStack
from cryohet.inference.frame_likelihood import FrameScorer, frame_maps, loglik_matrix, working_lattice
from cryohet.inference.populations import em_weights, gibbs_weights, total_variation
from cryohet.io.atomic_model import box_centre_A, read_atoms, write_models
from cryohet.io.particles import load_particles
from cryohet.io.star import read_star, write_star
from cryohet.io.trajectory import HEAVY, read_trajectory
from cryohet.methods.reweight import METHOD
from cryohet.runner import run_method
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.ensemble import simulate_ensemble, write_trajectory

BOX, APIX, RES = 48, 3.0, 8.0
WEIGHTS = np.array([0.4, 0.05, 0.1, 0.15, 0.3])
FAST = {"threads": 1, "mcmc_samples": 400, "burn_in": 100, "n_maps": 2}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """1500 particles at SNR 0.1 from 5 frames with populations 40/5/10/15/30 %."""
    return simulate_ensemble(tmp_path_factory.mktemp("noisy"), WEIGHTS, 1500, 0.1, BOX, APIX, RES, seed=3)


@pytest.fixture(scope="module")
def reweighted(noisy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rw")
    record = run_method(METHOD, {"particles": str(noisy.particles.particles_star), "trajectory": str(noisy.dcd),
                                 "topology": str(noisy.topology), **FAST}, out)
    return out, record


def _populations(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "populations.csv")


def test_recovers_uneven_populations(noisy, reweighted):
    """Measured: TV distance 0.012 (posterior mean) and 0.013 (EM) to the realised mixture (hard assignment of each
    image to its best frame: 0.061). The bound 0.04 is the statistical error the posterior itself reports
    (½ Σ_f sd_f ≈ 0.035 with s.d.s of 0.010-0.017): a bias beyond the data's own uncertainty fails it."""
    out, record = reweighted
    pop = _populations(out)
    tv = total_variation(pop["population"], noisy.populations)
    tv_ml = total_variation(pop["ml"], noisy.populations)
    tv_hard = total_variation(pop["hard_assignment"], noisy.populations)
    assert tv < 0.04 and tv_ml < 0.04, (pop, noisy.populations)
    assert max(tv, tv_ml) < tv_hard
    assert record.status == "finished"
    assert abs(pop["population"].sum() - 1) < 1e-5


def test_credible_intervals_cover_the_truth(noisy, reweighted):
    """Every frame's 95 % interval holds its realised population, and the intervals are as wide as the sampling
    error of 1500 images allows (s.d. at least that of a multinomial fraction, at most 3 times it)."""
    pop = _populations(reweighted[0])
    truth = noisy.populations
    assert ((pop["q2.5"] <= truth) & (truth <= pop["q97.5"])).all(), (pop, truth)
    multinomial = np.sqrt(truth * (1 - truth) / 1500)
    assert (pop["sd"] >= 0.9 * multinomial).all() and (pop["sd"] <= 3 * multinomial).all()


def test_outputs_and_particle_posteriors(noisy, reweighted):
    out, record = reweighted
    kinds = {o.kind for o in record.outputs}
    assert kinds == {"report", "plot", "particles_star", "latents", "volume_series", "atomic_model"}
    ll = np.load(out / "loglik.npy", mmap_mode="r")
    assert ll.shape == (1500, 5) and ll.dtype == np.float32
    table = starfile.read(out / "particles.star")["particles"]
    truth = np.load(noisy.particles.ground_truth)["state"]
    assert (table["cryohetReweightFrame"].values - 1 == truth).mean() > 0.8
    assert table["cryohetReweightFrameProbability"].between(0, 1).all()
    z, z_sd = np.load(out / "latents.npy"), np.load(out / "latents_std.npy")
    assert z.shape == (1500, 1) and np.allclose(z[:, 0], table["cryohetReweightCV"], atol=1e-5)
    # the posterior over frames: mean and s.d. of the frame number from its probabilities
    w = _populations(out)["population"].values
    p = np.exp(ll - ll.max(1, keepdims=True)) * w
    p /= p.sum(1, keepdims=True)
    mean = p @ np.arange(1, 6)
    assert np.allclose(z[:, 0], mean, atol=1e-3)
    assert np.allclose(z_sd[:, 0], np.sqrt(np.clip(p @ np.arange(1, 6) ** 2 - mean**2, 0, None)), atol=1e-3)
    # the free energy along frame order is −ln p of the populations, shifted to a minimum of 0
    fe = pd.read_csv(out / "free_energy.csv")
    pop = _populations(out)["population"].values
    assert np.allclose(fe["G_kT"], -np.log(pop) + np.log(pop.max()), atol=1e-3)
    assert (fe["G_2.5_kT"] <= fe["G_kT"] + 1e-6).all() and (fe["G_kT"] <= fe["G_97.5_kT"] + 1e-6).all()
    assert len(list(out.glob("frame_*.mrc"))) == 2
    assert len(mda.Universe(str(out / "top_frames.pdb")).trajectory) == 2


def test_per_image_scale(noisy, reweighted, tmp_path):
    """Each image's amplitude fitted per frame: every log-likelihood is at least the global scale's (the global
    value is one of the amplitudes it maximises over), and the populations are recovered as well."""
    out = tmp_path / "pi"
    run_method(METHOD, {"particles": str(noisy.particles.particles_star), "trajectory": str(noisy.dcd),
                        "topology": str(noisy.topology), **FAST, "n_maps": 0, "scale": "per_image"}, out)
    ll_pi, ll_g = np.load(out / "loglik.npy"), np.load(reweighted[0] / "loglik.npy")
    assert (ll_pi >= ll_g - 0.01).all()  # float32 values near -4300: steps of 5e-4
    assert total_variation(_populations(out)["population"], noisy.populations) < 0.04


def test_loglik_matches_a_direct_computation(noisy, reweighted):
    """log L of one image under one frame: the frame's atoms rendered on the full box, projected in real space
    with the CTF and the origin (``Projector.project``, as relion_project), the residual image transformed and
    cropped, summed over the half-plane of the resolution circle with the run's noise and scale."""
    out, _ = reweighted
    summary = json.loads((out / "summary.json").read_text())
    pset = load_particles(noisy.particles.particles_star)
    traj = read_trajectory(noisy.dcd, noisy.topology)
    lattice, radius = working_lattice(BOX, APIX, RES)
    pts = lattice.half_plane(radius)
    var = torch.as_tensor(summary["noise_var_per_shell"], dtype=torch.float64)[pts.shell]
    ll = np.load(out / "loglik.npy")
    for i, f in [(7, 0), (7, 3), (100, 2)]:
        vol = atoms_to_map(traj.xyz_A[f], BOX, APIX, RES, centre_A=box_centre_A(BOX, APIX), weights=traj.weight)
        A = torch.as_tensor(euler_to_matrix(pset.euler_deg[i:i + 1]), dtype=torch.float32)
        ctf = ctf_2d(pset.ctf.take([i]), BOX, APIX).to(torch.float32)
        model = Projector(torch.as_tensor(vol)).project(A, torch.as_tensor(pset.shift_A[i:i + 1] / APIX), ctf)
        resid = torch.as_tensor(pset.images([i])) - summary["scale_value"] * model
        R = pts.take(crop_transforms(fft2c(resid.double()), lattice.box))[0]
        direct = float(-(R.abs() ** 2 / var).sum() - torch.log(math.pi * var).sum())
        # measured: within 0.007 nats of log L ~ -4300 (frames differ by 20-60 nats for one image); what differs
        # is the interpolation on the cropped lattice against projection on the full box
        assert abs(ll[i, f] - direct) < 0.05, (i, f, ll[i, f], direct)


def test_noise_free_images_give_the_exact_mixture(tmp_path):
    data = simulate_ensemble(tmp_path / "clean", [0.5, 0.2, 0.3], 200, None, BOX, APIX, RES, seed=5)
    out = tmp_path / "rw"
    run_method(METHOD, {"particles": str(data.particles.particles_star), "trajectory": str(data.models_pdb),
                        **FAST}, out)
    pop = _populations(out)
    assert total_variation(pop["ml"], data.populations) < 1e-3
    # the posterior mean is Dirichlet(1 + counts)'s
    assert np.allclose(pop["population"], (data.populations * 200 + 1) / 203, atol=3e-3)
    table = starfile.read(out / "particles.star")["particles"]
    truth = np.load(data.particles.ground_truth)["state"]
    assert (table["cryohetReweightFrame"].values - 1 == truth).all()


def test_trajectory_formats_agree(noisy, tmp_path):
    """DCD, XTC (0.01 Å precision), multi-model PDB (0.001 Å) and mmCIF give the same populations."""
    sub = tmp_path / "sub.star"
    star = read_star(noisy.particles.particles_star)
    star["particles"] = star["particles"].iloc[:300]
    write_star(sub, star)
    (tmp_path / noisy.particles.particles_mrcs.name).symlink_to(noisy.particles.particles_mrcs)
    runs = {"dcd": (noisy.dcd, noisy.topology), "xtc": (noisy.xtc, noisy.topology),
            "pdb": (noisy.models_pdb, None), "cif": (noisy.models_cif, None)}
    pops = {}
    for name, (traj, top) in runs.items():
        values = {"particles": str(sub), "trajectory": str(traj), **FAST, "n_maps": 0}
        if top is not None:
            values["topology"] = str(top)
        run_method(METHOD, values, tmp_path / name)
        pops[name] = _populations(tmp_path / name)["population"].values
    for name in ("xtc", "pdb", "cif"):
        assert np.abs(pops[name] - pops["dcd"]).max() < 2e-3, (name, pops[name], pops["dcd"])


def test_projector_stack_equals_single_projectors():
    rng = np.random.default_rng(0)
    vols = torch.as_tensor(rng.normal(size=(3, 16, 16, 16)), dtype=torch.float32)
    A = torch.as_tensor(euler_to_matrix(random_euler(4, rng)), dtype=torch.float32)
    kxy = Lattice(16, 1.0).half_plane().kxy
    stacked = ProjectorStack(vols).slice_points(A, kxy)
    for k in range(3):
        assert torch.allclose(stacked[k], Projector(vols[k]).slice_points(A, kxy), atol=1e-5)


def test_gibbs_reproduces_the_dirichlet_posterior():
    """With each image's frame known (likelihood 1 for it, 0 otherwise) the posterior of the weights is
    Dirichlet(α + counts): the sampler's means and s.d.s match its moments."""
    counts = np.array([300, 50, 150])
    ll = np.full((counts.sum(), 3), -1e4, dtype=np.float32)
    ll[np.arange(counts.sum()), np.repeat(np.arange(3), counts)] = 0
    w, _, _ = em_weights(ll)
    assert np.allclose(w, counts / counts.sum(), atol=1e-6)
    s = gibbs_weights(ll, w, n_samples=4000, burn_in=10, alpha=2.0, seed=1)
    a = counts + 2.0
    mean = a / a.sum()
    sd = np.sqrt(mean * (1 - mean) / (a.sum() + 1))
    assert np.allclose(s.mean(0), mean, atol=3 * sd / np.sqrt(4000) + 1e-4)
    assert np.allclose(s.std(0), sd, rtol=0.08)


def test_collective_variables(noisy, tmp_path):
    traj = read_trajectory(noisy.models_pdb, stride=2)
    assert list(traj.frames) == [0, 2, 4]
    ref = rmsd_to_frame(traj, 1)
    u = mda.Universe(str(noisy.models_pdb))
    heavy = u.select_atoms("all")
    u.trajectory[0]
    x0 = heavy.positions.copy()
    u.trajectory[4]
    assert abs(ref[2] - rms.rmsd(heavy.positions, x0, center=True, superposition=True)) < 1e-4
    assert ref[0] == pytest.approx(0, abs=1e-4) and ref[1] < ref[2]
    d = com_distance(traj, "resid 122-159", "resid 30-59")   # LID and NMP close over the CORE: they approach
    assert d[0] > d[2]
    (tmp_path / "cv.txt").write_text("\n".join(str(v) for v in range(5)))
    assert list(cv_from_file(tmp_path / "cv.txt", traj)) == [0, 2, 4]
    (tmp_path / "bad.txt").write_text("1\n2\n")
    with pytest.raises(InputError, match="bad.txt.*2 values"):
        cv_from_file(tmp_path / "bad.txt", traj)
    prof = free_energy_profile(np.array([0.0, 0.1, 0.9, 1.0]), np.array([0.4, 0.2, 0.3, 0.1]),
                               np.array([[0.4, 0.2, 0.3, 0.1]] * 3), n_bins=2)
    assert np.allclose(prof.population, [0.6, 0.4]) and np.allclose(prof.G_kT, [0, np.log(0.6 / 0.4)])


def test_resume_continues_the_likelihood_pass(noisy, tmp_path):
    """A pass killed after two chunks resumes at the third and ends with the matrix of an uninterrupted pass."""
    pset = load_particles(noisy.particles.particles_star).subset(np.arange(600))
    traj = read_trajectory(noisy.dcd, noisy.topology)
    lattice, radius = working_lattice(BOX, APIX, RES)
    scorer = FrameScorer(frame_maps(traj.xyz_A, traj.weight, BOX, APIX, RES, lattice.box), lattice.half_plane(radius))
    kw = dict(batch_size=100, chunk_particles=200, settings={"test": 1})
    full, _ = loglik_matrix(pset, scorer, lattice, tmp_path / "full.npy", **kw)
    seen: list[str] = []

    def killed_in_chunk_3(items, desc, total):
        seen.append(desc)
        if "particles 401" in desc:
            raise KeyboardInterrupt
        return items

    with pytest.raises(KeyboardInterrupt):
        loglik_matrix(pset, scorer, lattice, tmp_path / "ll.npy", progress=killed_in_chunk_3, **kw)
    assert not (tmp_path / "ll.npy").exists() and (tmp_path / "ll.partial.npy").exists()
    seen.clear()
    ll, _ = loglik_matrix(pset, scorer, lattice, tmp_path / "ll.npy", resume=True,
                          progress=lambda items, desc, total: seen.append(desc) or items, **kw)
    assert seen == ["log-likelihoods of particles 401-600 of 600"]
    assert np.array_equal(ll, full)


def test_resume_of_a_finished_run_reuses_its_matrix(noisy, reweighted, tmp_path):
    out, _ = reweighted
    before = (out / "loglik.npy").stat().st_mtime_ns
    run_method(METHOD, {"particles": str(noisy.particles.particles_star), "trajectory": str(noisy.dcd),
                        "topology": str(noisy.topology), **FAST, "resume": True}, out)
    assert (out / "loglik.npy").stat().st_mtime_ns == before
    assert "is complete" in (out / "run.log").read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("cryohet")), "reweight", "--threads", "1", "--mcmc_samples", "100",
           "--burn_in", "20", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_cli_end_to_end_with_a_distance_cv(noisy, tmp_path):
    proc = _cli("--particles", str(noisy.particles.particles_star), "--trajectory", str(noisy.xtc), "--topology",
                str(noisy.topology), "--cv", "distance", "--cv_selection1", "resid 122-159", "--cv_selection2",
                "resid 30-59", "--cv_bins", "3", "--o", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    fe = pd.read_csv(tmp_path / "o" / "free_energy.csv")
    assert fe.columns[0] == "distance (Å)" and 2 <= len(fe) <= 3
    assert abs(fe["population"].sum() - 1) < 1e-5


@pytest.fixture(scope="module")
def bad_inputs(noisy, tmp_path_factory):
    """Broken versions of the inputs, each with the text its error must hold."""
    d = tmp_path_factory.mktemp("bad")
    atoms = read_atoms(noisy.topology, "heavy")
    frames = read_trajectory(noisy.dcd, noisy.topology).xyz_A
    ca = atoms.name == "CA"
    write_models(d / "ca.pdb", type(atoms)(**{k: (v[ca] if isinstance(v, np.ndarray) else v)
                                              for k, v in vars(atoms).items()}), frames[0][ca])
    write_trajectory(d / "far.dcd", noisy.topology, frames + np.array([200.0, 0, 0], dtype=np.float32))
    write_models(d / "one.pdb", atoms, frames[:1])
    (d / "junk.dcd").write_bytes(b"not a trajectory" * 10)
    star = read_star(noisy.particles.particles_star)
    for name, drop in (("noposes", ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]), ("noctf", ["rlnDefocusU"])):
        bad = dict(star)
        bad["particles"] = star["particles"].drop(columns=drop)
        write_star(d / f"{name}.star", bad)
        (d / noisy.particles.particles_mrcs.name).unlink(missing_ok=True)
        (d / noisy.particles.particles_mrcs.name).symlink_to(noisy.particles.particles_mrcs)
    good = str(noisy.particles.particles_star)
    return {
        "mismatch": ({"trajectory": d / "ca.pdb", "topology": noisy.topology}, "ca.pdb",
                     "does not match the topology"),
        "mismatch_dcd": ({"trajectory": noisy.dcd, "topology": d / "ca.pdb"}, "trajectory.dcd",
                         "does not match the topology"),
        "outside": ({"trajectory": d / "far.dcd", "topology": noisy.topology}, "far.dcd", "outside the box"),
        "one_frame": ({"trajectory": d / "one.pdb"}, "one.pdb", "at least two frames"),
        "junk": ({"trajectory": d / "junk.dcd", "topology": noisy.topology}, "junk.dcd", "cannot read"),
        "missing": ({"trajectory": d / "nothere.xtc", "topology": noisy.topology}, "nothere.xtc", "not found"),
        "no_topology": ({"trajectory": noisy.dcd}, "trajectory.dcd", "--topology"),
        "selection": ({"trajectory": noisy.models_pdb, "selection": "resname XYZ"}, "frames.pdb", "selects no atoms"),
        "no_poses": ({"particles": d / "noposes.star", "trajectory": noisy.models_pdb}, "noposes.star", "rlnAngle"),
        "no_ctf": ({"particles": d / "noctf.star", "trajectory": noisy.models_pdb}, "noctf.star", "rlnDefocusU"),
    }, good


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # MDAnalysis' DCDReader.__del__
@pytest.mark.parametrize("case", ["mismatch", "mismatch_dcd", "outside", "one_frame", "junk", "missing",
                                  "no_topology", "selection", "no_poses", "no_ctf"])
def test_bad_input_is_refused_naming_the_file(bad_inputs, case, tmp_path):
    cases, good = bad_inputs
    values, name, text = cases[case]
    values = {"particles": good, **{k: str(v) for k, v in values.items()}, **FAST}
    with pytest.raises(InputError) as err:
        run_method(METHOD, values, tmp_path / "o")
    assert name in str(err.value) and text in str(err.value), str(err.value)
    assert not (tmp_path / "o" / "populations.csv").exists() and not (tmp_path / "o" / "loglik.npy").exists()


def test_cli_bad_input_exit_code(bad_inputs, tmp_path):
    cases, good = bad_inputs
    values, name, text = cases["mismatch_dcd"]
    proc = _cli("--particles", good, "--trajectory", str(values["trajectory"]), "--topology",
                str(values["topology"]), "--o", str(tmp_path / "o"))
    assert proc.returncode == 2 and name in proc.stderr and text in proc.stderr
    assert not (tmp_path / "o" / "populations.csv").exists()


def test_landscape_takes_the_run(reweighted, tmp_path):
    """The expected CV and its s.d. are a 1-D latent with uncertainty: ``cryohet landscape --run`` reads them."""
    from cryohet.methods.landscape import METHOD as LANDSCAPE

    record = run_method(LANDSCAPE, {"run": str(reweighted[0]), "threads": 1, "path_maps": False}, tmp_path / "l")
    assert record.status == "finished" and (tmp_path / "l" / "free_energy.npy").is_file()
    assert "deconvolved from each particle's uncertainty" in (tmp_path / "l" / "run.log").read_text()


def test_description_loads_no_engine_module_and_names_the_trajectory_default():
    """The method's module is imported by every cryohet command: it loads neither MDAnalysis nor torch, and its
    default selection is the one the trajectory reader knows."""
    code = ("import sys, cryohet.methods.reweight as m; "
            "print(m.METHOD.param('selection').default, 'MDAnalysis' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [HEAVY, "False", "False"]

