"""landscape: free energy of latents deconvolved from their uncertainty, checked against a known population; the
minimum free-energy path; the method's outputs on simulated particles; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import starfile

from cryohet.analysis import landscape as L
from cryohet.errors import InputError
from cryohet.methods.landscape import METHOD
from cryohet.record import read_record
from cryohet.runner import run_method
from cryohet.validation.datasets import make_dataset

# long: make test runs this module in the current environment only (tests/conftest.py, one_stack)
pytestmark = pytest.mark.one_stack("current")

TAU = np.linspace(0, 1, 20)
POP = np.exp(-((TAU - 0.2) / 0.12) ** 2) + 0.6 * np.exp(-((TAU - 0.75) / 0.1) ** 2) + 0.04
POP = POP / POP.sum()


def _noisy_latents(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents of 20 states along τ with a two-well population, each blurred by its own s.d. (0.03-0.12)."""
    rng = np.random.default_rng(seed)
    state = rng.choice(20, n, p=POP)
    sd = rng.uniform(0.03, 0.12, n)
    return (TAU[state] + sd * rng.normal(size=n))[:, None], (sd**2)[:, None]


def _rms_kT(grid: L.Grid, G: np.ndarray) -> float:
    """Population-weighted RMS difference (kT) between G at the states and −log of their population, up to a
    constant."""
    d = grid.sample(G, TAU[:, None]) + np.log(POP)
    d -= np.average(d, weights=POP)
    return float(np.sqrt(np.average(d**2, weights=POP)))


def test_deconvolution_recovers_the_true_free_energy():
    """Measured (2000 latents): 0.12 kT RMS from the truth deconvolved at the cross-validated smoothing, 0.28-0.36
    kT for the plain density of the same latents at any bandwidth; cross-validation picks the middle width."""
    z, var = _noisy_latents(2000)
    grid = L.make_grid(z, np.sqrt(var), 200)
    smooth, scores = L.choose_smoothing(z, var, grid, np.array([0.005, 0.02, 0.08]))
    assert smooth == 0.02, scores
    G = L.free_energy(L.deconvolve(z, var, grid, smooth))
    plain = [_rms_kT(grid, L.free_energy(L.deconvolve(z, np.zeros_like(var), grid, bw, iterations=1)))
             for bw in (0.02, 0.04, 0.06)]
    assert _rms_kT(grid, G) < 0.18 and _rms_kT(grid, G) < min(plain) - 0.1, (_rms_kT(grid, G), plain)
    minima = L.local_minima(G)
    assert abs(grid.points()[minima[0]][0] - 0.2) < 0.06 and abs(grid.points()[minima[1]][0] - 0.75) < 0.06


def test_minimum_free_energy_path_follows_the_valley():
    """Two wells joined by a curved valley: the path stays in the valley, far below the straight line's barrier."""
    grid = L.Grid([np.linspace(-2, 2, 61), np.linspace(-2, 2, 61)])
    x, y = np.meshgrid(*grid.axes, indexing="ij")
    valley = (y - (1.2 - x**2)) ** 2  # the arc y = 1.2 - x² joins (-1, 0.2) and (1, 0.2)
    G = 4 * valley + 0.5 * (x**2 - 1) ** 2
    a, b = grid.nearest(np.array([[-1.0, 0.2], [1.0, 0.2]]))
    route = L.minimum_free_energy_path(G, grid, a, b)
    along = grid.sample(G, route)
    straight = grid.sample(G, np.column_stack([np.linspace(-1, 1, 50), np.full(50, 0.2)]))
    assert along.max() < 1.0 < straight.max()
    pts = L.resample_path(route, 7)
    assert len(pts) == 7 and np.allclose(pts[0], route[0]) and np.allclose(pts[-1], route[-1])


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hinge")
    ds = make_dataset("hinge", folder, box=32, n_particles=600, snr=1.0, n_states=20, populations=POP, seed=4)
    tau = np.load(folder / "ground_truth.npz")["tau"]
    rng = np.random.default_rng(1)
    sd = rng.uniform(0.03, 0.08, (len(tau), 1))
    np.save(folder / "z.npy", (tau + sd * rng.normal(size=sd.shape)).astype(np.float32))
    np.save(folder / "z_std.npy", sd.astype(np.float32))
    return ds, folder


def test_landscape_run_writes_energies_path_subsets_and_maps(hinge, tmp_path):
    ds, folder = hinge
    out = tmp_path / "ls"
    record = run_method(METHOD, {"particles": str(ds.particles_star), "latents": str(folder / "z.npy"),
                                 "latents_std": str(folder / "z_std.npy"), "bootstrap": 3, "path_points": 4,
                                 "min_particles": 50, "threads": 2}, out)
    assert read_record(out).status == "finished"
    table = starfile.read(out / "particles.star")["particles"]
    energy = np.load(out / "free_energy.npy")
    assert np.allclose(table["cryohetFreeEnergy"], energy[:, 0], atol=1e-4) and energy[:, 0].min() >= 0
    assert (energy[:, 1] >= 0).all()
    # the deepest minimum is the larger well (τ ≈ 0.2) and the path joins it to the other (τ ≈ 0.75)
    path = np.loadtxt(out / "path.txt")
    assert abs(path[0, 0] - 0.2) < 0.1 and abs(path[-1, 0] - 0.75) < 0.1
    subsets = [o for o in record.of_kind("particles_star") if "index" in o.meta]
    assert len(subsets) >= 3
    names = set(table["rlnImageName"])
    for o in subsets:
        sub = starfile.read(out / o.path)["particles"]
        assert len(sub) == o.meta["n"] and set(sub["rlnImageName"]) <= names
    maps = record.of_kind("volume_series")
    assert len(maps) == 4 and all((out / m.path).is_file() for m in maps)
    assert (out / "landscape.png").stat().st_size > 0 and (out / "path_profile.png").stat().st_size > 0


def test_bad_input_is_refused(hinge, tmp_path):
    ds, folder = hinge
    np.save(tmp_path / "std.npy", np.ones((10, 1), dtype=np.float32))
    with pytest.raises(InputError, match=r"z\.npy.*s\.d\..*differ in shape"):
        run_method(METHOD, {"latents": str(folder / "z.npy"), "latents_std": str(tmp_path / "std.npy")},
                   tmp_path / "a")
    with pytest.raises(ValueError, match="--path_to: the landscape has .* minima"):
        run_method(METHOD, {"latents": str(folder / "z.npy"), "path_to": "40", "bootstrap": 0, "grid": 40},
                   tmp_path / "b")
    with pytest.raises(ValueError, match="--dims"):
        run_method(METHOD, {"latents": str(folder / "z.npy"), "dims": 6}, tmp_path / "c")
    with pytest.raises(ValueError, match="reduce the latents to at most 4 principal components"):
        L.make_grid(np.zeros((10, 5)), None)
    for out in ("a", "b", "c"):  # (c is refused before its folder is made)
        written = {p.name for p in (tmp_path / out).iterdir()} if (tmp_path / out).exists() else set()
        assert written <= {"cryohet_run.json", "run.log"}
