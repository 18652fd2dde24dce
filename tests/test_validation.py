"""Benchmark datasets and scoring: every metric at its top for the true answer, near chance for a shuffled one."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from cryohet.errors import InputError
from cryohet.methods import benchmark_make, benchmark_score
from cryohet.record import RunRecord, read_record
from cryohet.runner import run_method
from cryohet.validation import metrics as M
from cryohet.validation.datasets import load_dataset
from cryohet.validation.external import CryoDRGNVolumeModel, load_latents, load_numpy_pickle
from cryohet.validation.score import score, score_arrays, score_run, score_true_answer
from cryohet.validation.sources import MAPS_MODEL_TYPE, MapsModel, ParticleVolumes

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")
NAMES = ("hinge", "interpolation", "two-part", "discrete")


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Path:
    """All four benchmark datasets, box 32, 300 particles, SNR 0.1, made by the benchmark-make command."""
    out = tmp_path_factory.mktemp("bench")
    run_method(benchmark_make.METHOD, {"dataset": "all", "box": 32, "n_particles": 300, "snr": 0.1,
                                       "n_states": 0, "threads": 1}, out)
    return out


# ----------------------------------------------------------------------------------------------- datasets

def test_benchmark_make_writes_all_datasets(bench: Path) -> None:
    rec = read_record(bench)
    assert rec.status == "finished"
    assert len(rec.of_kind("particles_star")) == 4 and len(rec.of_kind("ground_truth")) == 4
    dims = {}
    for name in NAMES:
        ds = load_dataset(bench / name)
        assert ds.n_particles == 300 and ds.box == 32 and ds.apix == pytest.approx(4.0)
        assert (bench / name / "particles.mrcs").stat().st_size >= 300 * 32 * 32 * 4
        assert ds.particles_star.is_file()
        dims[name] = (ds.kind, ds.latent_dim, ds.n_states)
        # realistic CTF: defocus within the range, some astigmatism
        text = ds.particles_star.read_text()
        assert "rlnDefocusU" in text and "cryohetTrueState" in text
        # the truth is consistent: each particle's τ is its state's τ
        np.testing.assert_allclose(ds.tau, ds.state_tau[ds.state])
    assert dims == {"hinge": ("continuous", 1, 20), "interpolation": ("continuous", 1, 20),
                    "two-part": ("continuous", 2, 25), "discrete": ("discrete", 1, 4)}
    pops = load_dataset(bench / "discrete").populations
    assert pops[0] > pops[1] > pops[3] and pops[0] > 0.3  # uneven (nominal 0.4/0.3/0.2/0.1)
    # true maps of different states differ; of the same motion they stay alike
    ds = load_dataset(bench / "hinge")
    m = ds.true_model()
    c = np.corrcoef(m.map(0).ravel(), m.map(19).ravel())[0, 1]
    assert 0.3 < c < 0.99


# ------------------------------------------------------------------------------------------------ scoring

@pytest.mark.parametrize("name", NAMES)
def test_truth_scores_top_and_shuffled_near_chance(bench: Path, name: str, tmp_path: Path) -> None:
    good = score_true_answer(bench / name, n_per_state=2, max_states=8)
    bad = score_true_answer(bench / name, shuffle=True, n_per_state=2, max_states=8)
    g, b = good["summary"], bad["summary"]
    nyquist = 2 * load_dataset(bench / name).apix
    # volumes: perfect answer at the top, shuffled one at the chance reference
    assert g["fsc_auc"] == pytest.approx(1.0, abs=1e-6)
    assert g["res_0.5_A"] == pytest.approx(nyquist) and g["res_0.143_A"] == pytest.approx(nyquist)
    assert b["fsc_auc"] < g["fsc_auc"] - 0.05 and b["fsc_auc"] == pytest.approx(b["chance_fsc_auc"], abs=0.06)
    assert b["fsc_auc"] < b["mean_map_fsc_auc"] + 0.03 and b["res_0.143_A"] >= nyquist
    if name != "hinge":  # the hinge moves a small domain only: at box 32 its states agree to Nyquist at 0.5
        assert b["res_0.5_A"] > nyquist + 1.0
    # latents: every metric at 1 for the truth, near its chance level when shuffled
    gm, bm = good["latent"]["metrics"], bad["latent"]["metrics"]
    for metric, value in gm.items():
        assert value == pytest.approx(1.0, abs=0.02), metric
    assert bm["knn_overlap"] < 0.4 and bm["knn_overlap"] == pytest.approx(bad["latent"]["chance"]["knn_overlap"],
                                                                          abs=0.1)
    if name == "discrete":
        assert abs(bm["ari"]) < 0.1
    else:
        assert bm["spearman_best_axis"] < 0.25 and bm["cca_mean"] < 0.25 and bm["knn_r2"] < 0.1
        if name != "two-part":
            assert bm["spearman_pc1"] < 0.25
    assert g["latent_score"] == pytest.approx(1.0, abs=1e-6) and abs(b["latent_score"]) < 0.4


def test_benchmark_score_command_writes_report(bench: Path, tmp_path: Path) -> None:
    for ref in ("truth", "shuffled"):
        out = tmp_path / ref
        run_method(benchmark_score.METHOD, {"dataset": str(bench / "two-part"), "reference": ref, "n_per_state": 1,
                                            "max_states": 5, "threads": 1}, out)
        rec = read_record(out)
        assert rec.status == "finished"
        kinds = sorted(o.kind for o in rec.outputs)
        assert kinds == ["plot", "plot", "report", "report"]
        md = (out / "report.md").read_text()
        assert "FSC AUC" in md and "knn_overlap" in md and "fsc_curves.png" in md
        assert (out / "latents_by_truth.png").stat().st_size > 1000
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["summary"]["latent_metric"] == "knn_overlap"
    auc = [read_record(tmp_path / r).of_kind("report")[0].meta["fsc_auc"] for r in ("truth", "shuffled")]
    assert auc[0] > auc[1] + 0.1


def _fake_run(run_dir: Path, latents: np.ndarray, model: MapsModel) -> Path:
    """A run folder as a method writes it: latents.npy + a 'maps' model, listed in the run record."""
    run_dir.mkdir(parents=True)
    np.save(run_dir / "latents.npy", latents.astype(np.float32))
    model.save(run_dir / "model.json")
    rec = RunRecord(method="fake-method", params={}, status="finished")
    rec.add("latents", "latents.npy", run_dir)
    rec.add("model", "model.json", run_dir, model_type=MAPS_MODEL_TYPE)
    rec.write(run_dir)
    return run_dir


def test_score_run_folder(bench: Path, tmp_path: Path) -> None:
    ds = load_dataset(bench / "hinge")
    good = _fake_run(tmp_path / "good", ds.true_latents(), ds.true_model())
    r = score_run(good, ds.root, n_per_state=1, max_states=5)
    assert r["label"] == "fake-method"
    assert r["summary"]["fsc_auc"] == pytest.approx(1.0, abs=1e-6) and r["summary"]["latent_score"] > 0.99
    # a run whose latents are right but negated and rescaled (the model's own coordinates): still perfect
    flipped = MapsModel(ds.map_paths, -3.0 * ds.state_tau, ds.apix)
    r = score_run(_fake_run(tmp_path / "flip", -3.0 * ds.true_latents(), flipped), ds.root, n_per_state=1,
                  max_states=5)
    assert r["summary"]["fsc_auc"] == pytest.approx(1.0, abs=1e-6) and r["summary"]["latent_score"] > 0.99
    with pytest.raises(InputError, match="latent rows"):
        score_run(_fake_run(tmp_path / "short", ds.true_latents()[:10], ds.true_model()), ds.root)


def test_score_arrays_and_cryodrgn_pickle(bench: Path, tmp_path: Path) -> None:
    ds = load_dataset(bench / "discrete")
    vols = tmp_path / "vols"
    vols.mkdir()
    for i, p in enumerate(ds.map_paths):  # one map per cluster, cryoDRGN's names
        shutil.copy(p, vols / f"vol_{i:03d}.mrc")
    z = ds.true_latents().astype(np.float32) + 0.01 * np.random.default_rng(0).normal(size=(300, 1)).astype(np.float32)
    with open(tmp_path / "z.10.pkl", "wb") as f:  # as cryoDRGN writes z.N.pkl: mu then logvar
        pickle.dump(z, f)
        pickle.dump(np.zeros_like(z), f)
    np.save(tmp_path / "labels.npy", ds.state)
    r = score_arrays(tmp_path / "z.10.pkl", ds.root, vols, volume_labels=tmp_path / "labels.npy", n_per_state=2)
    assert r["summary"]["fsc_auc"] == pytest.approx(1.0, abs=1e-6) and r["summary"]["latent_score"] > 0.99
    np.savetxt(tmp_path / "centers.txt", ds.state_tau)
    r = score_arrays(tmp_path / "z.10.pkl", ds.root, vols, volume_latents=tmp_path / "centers.txt", n_per_state=2)
    assert r["summary"]["fsc_auc"] == pytest.approx(1.0, abs=1e-6)
    wrong = np.random.default_rng(1).integers(0, 4, 300)
    r = score_arrays(z, ds.root, vols, volume_labels=wrong, n_per_state=2)
    assert r["summary"]["fsc_auc"] < 0.95
    # the same through the command, with a text latent file and the volume folder
    np.savetxt(tmp_path / "z.txt", z)
    out = tmp_path / "cmd"
    run_method(benchmark_score.METHOD, {"dataset": str(ds.root), "latents": str(tmp_path / "z.txt"),
                                        "volumes": str(vols), "volume_labels": str(tmp_path / "labels.npy"),
                                        "n_per_state": 1, "threads": 1}, out)
    assert json.loads((out / "metrics.json").read_text())["summary"]["latent_score"] > 0.99


def test_latents_only_and_volume_model_protocol(bench: Path) -> None:
    ds = load_dataset(bench / "hinge")
    r = score(ds, ds.true_latents())
    assert "volume" not in r and r["summary"]["latent_score"] > 0.99
    pv = ParticleVolumes.from_model(ds.true_model(), ds.true_latents())
    r = score(ds, None, pv, n_per_state=1, max_states=3)
    assert "latent" not in r and r["volume"]["n_states_evaluated"] == 3
    with pytest.raises(InputError, match="coordinates"):
        ParticleVolumes.from_model(ds.true_model(), np.zeros((300, 2)))


# ------------------------------------------------------------------------------------- external formats

class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))

    def __init__(self, flag: Path):
        self.flag = flag


def test_restricted_unpickler_rejects_code(tmp_path: Path) -> None:
    flag = tmp_path / "pwned"
    for payload in (_Evil(flag), [np.zeros(3), _Evil(flag)]):
        path = tmp_path / "evil.pkl"
        with open(path, "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(InputError, match="refusing"):
            load_numpy_pickle(path)
        with pytest.raises(InputError):
            load_latents(path)
        assert not flag.exists()
    # eval via builtins, and a plain Python object, are refused as well
    path = tmp_path / "eval.pkl"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(InputError, match="builtins.eval"):
        load_numpy_pickle(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError):
        load_numpy_pickle(path)


def test_restricted_unpickler_accepts_numpy(tmp_path: Path) -> None:
    z = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    for proto in (3, 4, 5):  # cryoDRGN: pickle.dump(z, f) (protocol 4 up to Python 3.13, 5 from 3.14)
        path = tmp_path / f"z{proto}.pkl"
        with open(path, "wb") as f:
            pickle.dump(z, f, protocol=proto)
        np.testing.assert_array_equal(load_numpy_pickle(path), z)
        np.testing.assert_array_equal(load_latents(path), z)
    path = tmp_path / "tuple.pkl"
    path.write_bytes(pickle.dumps((z, np.int64(3), [np.arange(3)])))
    out = load_numpy_pickle(path)
    assert isinstance(out, tuple) and out[1] == 3
    np.testing.assert_array_equal(load_latents(path), z)


def test_cryodrgn_volumes_need_cryodrgn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="cryodrgn"):
        CryoDRGNVolumeModel(tmp_path / "weights.pkl", tmp_path / "config.yaml", 8, 32, 4.0)


# ------------------------------------------------------------------------------------------------ metrics

def test_latent_metrics_invariances_and_ties() -> None:
    rng = np.random.default_rng(0)
    tau = rng.uniform(size=(400, 2))
    rot = np.linalg.qr(rng.normal(size=(2, 2)))[0]
    z = -5.0 * tau @ rot.T + 3.0
    assert M.knn_overlap(z, tau, 10) == pytest.approx(1.0)
    assert np.all(M.cca_correlations(z, tau) > 0.999)
    assert M.spearman_pc1(-tau[:, :1], tau[:, :1]) == pytest.approx(1.0)
    # ties in the truth (states): a latent that keeps states apart scores 1
    state = rng.integers(0, 5, 400)
    assert M.knn_overlap(state[:, None] + 0.01 * rng.normal(size=(400, 1)), state[:, None].astype(float), 10) == 1.0
    assert M.kmeans_ari(np.eye(5)[state] * 4 + 0.1 * rng.normal(size=(400, 5)), state) == pytest.approx(1.0)
    noise = rng.normal(size=(400, 3))
    assert M.knn_overlap(noise, tau, 10) < 0.1
    assert np.all(M.cca_correlations(noise, tau) < 0.2)
    assert M.knn_regression_r2(noise, tau) < 0.05 < 0.95 < M.knn_regression_r2(z, tau)


def test_score_run_with_linear_model(bench: Path, tmp_path: Path) -> None:
    """A 'linear' run (principal volumes of the true maps, particles at their maps' coordinates) is scored through
    cryohet.models.base.load_volume_model: near the top with enough components, lower with one."""
    from cryohet.models.linear import LinearModel

    ds = load_dataset(bench / "two-part")
    m = ds.true_model()
    maps = np.stack([m.map(k) for k in range(ds.n_states)]).reshape(ds.n_states, -1).astype(np.float64)
    mean = maps.mean(0)
    _, s, vt = np.linalg.svd(maps - mean, full_matrices=False)
    aucs = []
    for n_comp in (1, 6):
        coords = (maps - mean) @ vt[:n_comp].T
        model = LinearModel(mean.reshape((32,) * 3), vt[:n_comp].reshape((n_comp,) + (32,) * 3),
                            s[:n_comp] ** 2 / ds.n_states, ds.apix)
        run = tmp_path / f"linear{n_comp}"
        run.mkdir()
        model.save(run / "model.npz")
        np.save(run / "latents.npy", coords[ds.state].astype(np.float32))
        rec = RunRecord(method="principal-volumes", params={}, status="finished")
        rec.add("latents", "latents.npy", run)
        rec.add("model", "model.npz", run, model_type="linear")
        rec.write(run)
        r = score_run(run, ds.root, n_per_state=1, max_states=6)
        aucs.append(r["summary"]["fsc_auc"])
        assert r["summary"]["latent_score"] > (0.95 if n_comp == 6 else 0.2)
    assert aucs[1] > 0.97 and aucs[1] > aucs[0]
