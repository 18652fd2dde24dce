"""CryoBench analogues (benchmark-make) and CryoBench's scores (benchmark-score): the datasets' truth against
their own atomic models and MDAnalysis, the metrics against hand-computed values and their known extremes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryohet.io.mrc import read_map
from cryohet.methods import benchmark_make
from cryohet.record import read_record
from cryohet.runner import run_method
from cryohet.simulate.cryobench import BUILDERS, assembly_states, igg_1d, ribosembly_populations
from cryohet.simulate.density import atoms_to_map
from cryohet.validation import cryobench_score as C
from cryohet.validation import metrics as M
from cryohet.validation.datasets import CRYOBENCH, SIZES, load_dataset
from cryohet.validation.score import score_true_answer

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
N_STATES = 6


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    """The five analogues, box 32, 120 particles, 6 states each, made by the benchmark-make command."""
    out = tmp_path_factory.mktemp("cryobench")
    run_method(benchmark_make.METHOD, {"dataset": "cryobench", "box": 32, "n_particles": 120, "snr": 0.01,
                                       "n_states": N_STATES, "threads": 1}, out)
    return out


# ----------------------------------------------------------------------------------------------- datasets

def test_every_analogue_is_made_with_readable_truth(sets: Path) -> None:
    rec = read_record(sets)
    assert rec.status == "finished" and len(rec.of_kind("ground_truth")) == len(CRYOBENCH) == 5
    kinds = {}
    for name in CRYOBENCH:
        ds = load_dataset(sets / name)
        assert ds.n_particles == 120 and ds.box == 32 and ds.apix == pytest.approx(384 / 32)
        np.testing.assert_allclose(ds.tau, ds.state_tau[ds.state])
        maps = np.stack([ds.true_model().map(k) for k in range(ds.n_states)])
        # every state's map differs from every other's (no two states are the same structure)
        flat = maps.reshape(len(maps), -1)
        corr = np.corrcoef(flat)[~np.eye(len(maps), dtype=bool)]
        assert corr.max() < 0.999, name
        kinds[name] = (ds.kind, ds.latent_dim, ds.n_states)
    assert kinds == {"igg-1d": ("continuous", 2, 6), "igg-rl": ("continuous", 3, 6),
                     "ribosembly": ("discrete", 1, 6), "tomotwin": ("discrete", 1, 6),
                     "spike-md": ("continuous", 3, 6)}
    # IgG-1D's τ is the dihedral angle on the unit circle, evenly spaced over 360°
    tau = load_dataset(sets / "igg-1d").state_tau
    np.testing.assert_allclose(np.hypot(tau[:, 0], tau[:, 1]), 1.0)
    np.testing.assert_allclose(np.rad2deg(np.arctan2(tau[:, 1], tau[:, 0])) % 360, np.arange(6) * 60.0, atol=1e-9)


def test_spike_md_frames_read_by_mdanalysis_give_the_true_maps(sets: Path) -> None:
    import MDAnalysis as mda

    ds = load_dataset(sets / "spike-md")
    u = mda.Universe(str(sets / "spike-md/trajectory/topology.pdb"), str(sets / "spike-md/trajectory/frames.dcd"))
    assert len(u.trajectory) == N_STATES and len(u.atoms) > 3000
    assert sorted(set(u.atoms.segids) | set(u.atoms.chainIDs)) >= ["A", "B", "C"]
    from cryohet.io.atomic_model import box_centre_A, read_atoms

    weights = read_atoms(sets / "spike-md/trajectory/topology.pdb", "heavy").weight
    for f in (0, N_STATES - 1):
        u.trajectory[f]
        vol = atoms_to_map(u.atoms.positions.astype(np.float64), ds.box, ds.apix, ds.meta["motion"]["resolution_A"],
                           centre_A=box_centre_A(ds.box, ds.apix), weights=weights)
        ref = read_map(ds.map_paths[f])[0]
        assert np.corrcoef(vol.ravel(), ref.ravel())[0, 1] > 0.9999   # DCD stores float32 coordinates


def test_ribosembly_is_an_assembly_series_with_uneven_populations() -> None:
    sets16 = assembly_states(16)
    assert len({tuple(s) for s in sets16}) == 16
    assert all(set(range(4)) <= set(s) for s in sets16)             # the core is always there
    assert sorted(len(s) for s in sets16)[0] == 4 and max(len(s) for s in sets16) == 10
    p = ribosembly_populations(16)
    assert p.sum() == pytest.approx(1.0) and p.max() / p.min() > 4
    conf = BUILDERS["ribosembly"](16, 24, 16.0, 40.0)
    full, core = conf.maps[np.argmax([len(s) for s in sets16])], conf.maps[0]
    assert full.sum() == pytest.approx(core.sum() * 10 / 4, rel=1e-3)  # maps add up subunit by subunit


def test_igg_1d_moves_only_the_arm_about_its_axis() -> None:
    conf = igg_1d(4, 32, 12.0, 30.0)
    # a full turn: state 0 and the state after 4 quarter turns coincide, a half-turn differs
    again = igg_1d(4, 32, 12.0, 30.0, seed=0)
    np.testing.assert_array_equal(conf.maps, again.maps)                  # deterministic given the seed
    assert not np.allclose(conf.maps[0], conf.maps[2], atol=1e-4 * conf.maps.max())
    assert conf.maps[0].sum() == pytest.approx(conf.maps[2].sum(), rel=1e-3)


def test_cpu_size_preset_uses_cryobench_image_settings(tmp_path: Path) -> None:
    run_method(benchmark_make.METHOD, {"dataset": "igg-1d", "size": "cpu", "n_particles": 300, "n_states": 3,
                                       "top_view_fraction": 0.5, "threads": 1}, tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.meta["top_view_fraction"] == 0.5
    tilt = starfile.read(tmp_path / "particles.star")["particles"]["rlnAngleTilt"].to_numpy()
    near_top = np.mean(np.minimum(tilt, 180 - tilt) < 45)  # uniform views: 0.29; half of them near the top: 0.65
    assert 0.55 < near_top < 0.75, near_top
    cpu = SIZES["cpu"]
    assert (ds.box, ds.apix, ds.meta["snr"], ds.n_particles) == (cpu.box, cpu.apix, cpu.snr, 300)
    gt = np.load(tmp_path / "ground_truth.npz")
    shift_px = gt["shift_A"] / ds.apix
    assert np.abs(shift_px).max() <= cpu.shift_max_px and np.abs(shift_px).max() > 0.8 * cpu.shift_max_px
    assert np.abs(shift_px).mean() == pytest.approx(cpu.shift_max_px / 2, rel=0.15)   # uniform in ±max
    dfm = (gt["defocus_u_A"] + gt["defocus_v_A"]) / 2
    lo, hi = cpu.defocus_range_A
    assert lo <= dfm.min() and dfm.max() <= hi
    assert np.median(dfm) == pytest.approx(np.sqrt(lo * hi), rel=0.15)                # log-normal about the middle
    assert SIZES["full"].box == 128 and SIZES["full"].apix == 3.0 and SIZES["full"].shift_max_px == 20


# ----------------------------------------------------------------------------------------------- scores

def test_scores_of_the_truth_and_of_shuffled_truth(sets: Path) -> None:
    for name in ("igg-1d", "tomotwin"):
        truth = score_true_answer(sets / name)
        shuffled = score_true_answer(sets / name, shuffle=True)
        t, s = truth["summary"], shuffled["summary"]
        fsc = truth["cryobench"]["fsc"]
        assert fsc["images"] == list(range(120)) and fsc["max_auc"] == pytest.approx(15 / 32)
        assert t["per_image_fsc_auc"] == pytest.approx(15 / 32) and t["per_state_fsc_auc"] == pytest.approx(15 / 32)
        assert s["per_image_fsc_auc"] < t["per_image_fsc_auc"] - 0.01
        assert t["neighbourhood_similarity"] > s["neighbourhood_similarity"] + 0.2
        assert s["neighbourhood_similarity"] == pytest.approx(truth["cryobench"]["neighbourhood_similarity"]
                                                              ["chance"], abs=0.05)
        assert t["ii_truth_to_latent"] < 0.1 and s["ii_truth_to_latent"] > 0.6
        assert t["ii_latent_to_truth"] < 0.3 and s["ii_latent_to_truth"] > 0.6


def test_image_indices_are_cryobench_s() -> None:
    np.testing.assert_array_equal(C.image_indices(1000), np.arange(0, 1000, 10))
    np.testing.assert_array_equal(C.image_indices(50), np.arange(50))


def test_cryobench_fsc_matches_its_shell_definition() -> None:
    rng = np.random.default_rng(0)
    box = 16
    a, b = rng.normal(size=(2, box, box, box))
    b = a + 2 * b
    # CryoBench: centred transforms, shell i = voxels with i-1 <= r < i, FSC[0] = 1
    fa, fb = (np.fft.fftshift(np.fft.fftn(v)) for v in (a, b))
    x = np.arange(-box // 2, box // 2)
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(x, x, x, indexing="ij")))
    ref = [1.0]
    for i in range(1, box // 2):
        s = (r < i) & (r >= i - 1)
        ref.append(float((np.vdot(fa[s], fb[s]) / np.sqrt(np.vdot(fa[s], fa[s]) * np.vdot(fb[s], fb[s]))).real))
    curve = M.cryobench_fsc(a, b)
    np.testing.assert_allclose(curve, ref, atol=1e-12)
    # sklearn.metrics.auc over k/D, as CryoBench
    from sklearn.metrics import auc

    assert M.cryobench_auc(curve) == pytest.approx(auc(np.arange(box // 2) / box, np.abs(curve)))
    assert M.cryobench_auc(M.cryobench_fsc(a, a)) == pytest.approx(7 / 16)


def test_neighbourhood_similarity_known_values() -> None:
    # hand-computed, k = 1 (ties to the lower index): truth neighbours 1,0,1,2,3; latent 1,0,1,4,2 -> 3 of 5
    t = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    z = np.array([0.0, 1.0, 2.0, 4.0, 3.0])
    assert M.neighbourhood_similarity(t, z, [1])[0] == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 3))
    ks = [8, 40, 160]
    np.testing.assert_allclose(M.neighbourhood_similarity(x, x, ks), 1.0)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    np.testing.assert_allclose(M.neighbourhood_similarity(x, 3.0 * x @ rot + 7.0, ks), 1.0)   # similarity map
    chance = M.neighbourhood_similarity(x, rng.permutation(x), ks)
    np.testing.assert_allclose(chance, np.array(ks) / 799, atol=0.015)
    # a monotone but curved map of a 1-D latent keeps most neighbourhoods (only their sides shift)
    u = rng.uniform(size=800)
    assert M.neighbourhood_similarity(u, np.exp(3 * u), [8])[0] > 0.9


def test_the_null_band_of_neighbourhood_similarity_holds_chance_and_not_a_weak_signal() -> None:
    """``neighbourhood_null``: the band of latents without information holds the chance level (k/(n−1) averaged
    as the score averages it) and most fresh uninformative latents; a latent that carries a weak signal (the
    truth plus noise 3 times its spread) lies above it, the truth far above."""
    rng = np.random.default_rng(4)
    truth = rng.uniform(size=(1000, 1))
    null = C.neighbourhood_null(truth)
    chance = C.neighbourhood_score(rng.normal(size=(1000, 8)), truth)["chance"]
    assert null["lo"] < chance < null["hi"] and null["hi"] - null["lo"] < 0.02
    fresh = [C.neighbourhood_score(rng.normal(size=(1000, 8)), truth)["value"] for _ in range(20)]
    assert sum(null["lo"] <= v <= null["hi"] for v in fresh) >= 16
    weak = np.hstack([truth + 3 * truth.std() * rng.normal(size=truth.shape), rng.normal(size=(1000, 7)) * 0.1])
    assert C.neighbourhood_score(weak, truth)["value"] > null["hi"]
    assert C.neighbourhood_score(truth, truth)["value"] > 0.9


def test_information_imbalance_known_values() -> None:
    # hand-computed: A's nearest neighbours 1, 0, 1, 2 have ranks 3, 3, 3, 1 in B -> 2 * 2.5 / 4
    a = np.array([0.0, 1.0, 3.0, 7.0])
    b = np.array([0.0, 5.0, 1.0, 2.0])
    assert M.information_imbalance(a, b) == pytest.approx(1.25)
    assert M.information_imbalance(a, -a) == pytest.approx(0.5)          # same distances: every rank 1
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 3))
    assert M.information_imbalance(x, x) == pytest.approx(2 / 1000)
    assert M.information_imbalance(x, rng.permutation(x)) == pytest.approx(1.0, abs=0.1)
    # the full space predicts a part of it, not the reverse
    assert M.information_imbalance(x, x[:, :1]) < 0.2 < 0.6 < M.information_imbalance(x[:, :1], x)
