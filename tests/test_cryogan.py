"""cryogan: with known poses, the generated map against the true mean map of simulated hinge data; the unknown-pose,
Multi-CryoGAN mode on two half-sets runs, resumes from its checkpoints and writes its outputs; bad input is
refused."""
from __future__ import annotations

import numpy as np
import pytest

from cryohet.errors import InputError
from cryohet.io.mrc import read_map
from cryohet.io.star import read_star, write_star
from cryohet.simulate.molecules import default_molecule
from cryohet.simulate.motions import hinge_conformations
from cryohet.simulate.simulate import simulate_particles

BOX, APIX, N, SNR = 32, 3.0, 300, 1.0
#: working limit of the runs (a 16 px working box)
RES_A = 16.0
FAST = {"resolution_A": RES_A, "batch_size": 32, "threads": 1}


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    conf = hinge_conformations(default_molecule(), n_states=20, max_angle_deg=50.0, box=BOX, apix=APIX,
                               resolution_A=8.0)
    out = simulate_particles(conf, tmp_path_factory.mktemp("hinge"), N, SNR, seed=3)
    return conf.maps[np.load(out.ground_truth)["state"]].mean(0), out


# the long accuracy test runs in the pinned environment only under make test (tests/conftest.py, one_stack)
@pytest.mark.one_stack("pinned")
def test_known_poses_map_against_truth(hinge, tmp_path):
    from cryohet.inference.ppca import band_limit
    from cryohet.methods.cryogan import METHOD
    from cryohet.reconstruct.fsc import fsc
    from cryohet.record import read_record
    from cryohet.runner import run_method

    mean_true, out = hinge
    run_dir = tmp_path
    run_method(METHOD, {"particles": str(out.particles_star), "poses": "known", "steps": 150, **FAST}, run_dir)
    rec = read_record(run_dir)
    assert rec.status == "finished"
    ours = read_map(run_dir / "map.mrc")[0]
    assert ours.shape == (BOX,) * 3
    truth = band_limit(mean_true[None], APIX, 2 * APIX * BOX / 16)[0]         # the working box's Nyquist
    # chance: the truth's spherical average (a map with no orientation information) is close at the lowest shells
    c = np.arange(BOX) - BOX // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).round().astype(int)
    blob = (np.bincount(r.ravel(), truth.ravel()) / np.bincount(r.ravel()))[r]
    ours_fsc, blob_fsc = fsc(ours, truth), fsc(blob, truth)
    # shells 3-4 (32-24 Å), where the shape's details start: measured 0.66 (the spherical average 0.32)
    assert ours_fsc[3:5].mean() > 0.5, np.round(ours_fsc, 2)
    assert ours_fsc[3:5].mean() > blob_fsc[3:5].mean() + 0.2, (np.round(ours_fsc, 2), np.round(blob_fsc, 2))
    assert ours_fsc[1:3].min() > 0.8
    assert np.corrcoef(ours.ravel(), truth.ravel())[0, 1] > 0.75                 # measured 0.81
    kinds = {o.kind for o in rec.outputs}
    assert {"volume", "fsc", "plot", "report"} <= kinds
    assert (run_dir / "checkpoint.safetensors").is_file()


def test_unknown_poses_multi_halves_run_and_resume(hinge, tmp_path):
    from cryohet.methods.cryogan import METHOD
    from cryohet.models.base import load_volume_model
    from cryohet.record import read_record
    from cryohet.runner import run_method

    _, out = hinge
    args = {"particles": str(out.particles_star), "zdim": 2, "steps": 6, "checkpoint_every": 3, "n_critic": 2,
            "movie_frames": 2, "halves": True, **FAST}
    run_method(METHOD, args, tmp_path)
    first = read_record(tmp_path)
    assert first.status == "finished"
    # go on from the checkpoint to 10 steps
    run_method(METHOD, {**args, "steps": 10, "resume": True, "overwrite": True}, tmp_path)
    rec = read_record(tmp_path)
    assert rec.status == "finished" and [c["iterations"] for c in rec.convergence] == [10, 10]
    assert (tmp_path / "run.log").read_text().count("resumed from") == 2                 # both half-sets
    assert {o.path for o in rec.outputs if o.kind == "half_map"} == {"half1.mrc", "half2.mrc"}
    assert (tmp_path / "fsc.star").is_file()
    model = load_volume_model(tmp_path)
    assert model.latent_dim == 2
    comps = np.stack([read_map(tmp_path / f"component_{k:02d}.mrc")[0] for k in (1, 2)]).reshape(2, -1)
    assert np.allclose(comps @ comps.T, np.eye(2), atol=1e-3)           # orthonormal principal volumes
    assert (tmp_path / "mean.mrc").is_file() and (tmp_path / "losses.png").is_file()
    assert len(list((tmp_path / "movies" / "component_01").glob("*.mrc"))) == 2
    # a checkpoint written with other settings is refused
    with pytest.raises(InputError, match="checkpoint.*other settings.*zdim"):
        run_method(METHOD, {**args, "zdim": 1, "resume": True, "overwrite": True}, tmp_path)


def test_bad_input(hinge, tmp_path):
    from cryohet.methods.cryogan import METHOD
    from cryohet.runner import run_method

    _, out = hinge
    tables = read_star(out.particles_star)
    parts = tables["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    write_star(tmp_path / "noctf.star", {"optics": tables["optics"], "particles": parts})
    with pytest.raises(InputError, match="noctf.star.*no CTF parameters"):
        run_method(METHOD, {"particles": str(tmp_path / "noctf.star"), "datadir": str(out.particles_star.parent)},
                   tmp_path / "a")
    # batches far beyond the memory plan
    with pytest.raises(InputError, match="particles.star.*needs about .* GB.*--batch_size"):
        run_method(METHOD, {"particles": str(out.particles_star), "batch_size": 10 ** 8}, tmp_path / "b")
    with pytest.raises(InputError, match="particles.star.*beyond the images' Nyquist"):
        run_method(METHOD, {"particles": str(out.particles_star), "resolution_A": 5.0}, tmp_path / "c")
    for name in ("a", "b", "c"):
        assert {p.name for p in (tmp_path / name).iterdir()} <= {"cryohet_run.json", "run.log"}
