"""``cryohet analyze``, ``eval-volume`` and ``select`` on run folders, through the real runner.

The training run is a real run folder: a linear model of the volumes (cryohet.models.linear, whose maps are
known analytically), latents with known clusters and, for ``select``, a particles STAR of a real image stack
(cryoDRGN's toy_projections, copied) written by cryohet.io. Subsets are checked row by row, read back with
starfile and read by RELION 3.1 (relion_star_handler, relion_image_handler --stats).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
from relion_tools import THIRDPARTY, relion
from sklearn.metrics import adjusted_rand_score

from cryohet.analysis.runs import particles_star_path
from cryohet.errors import InputError
from cryohet.io.mrc import read_map
from cryohet.io.particles import load_particles, write_particles_star
from cryohet.methods.analyze import METHOD as ANALYZE
from cryohet.methods.eval_volume import METHOD as EVAL
from cryohet.methods.select import METHOD as SELECT
from cryohet.models.linear import LinearModel
from cryohet.record import RunRecord, read_record
from cryohet.runner import run_method

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def latents_with_clusters(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n latents in d dimensions around three well-separated centres, and their true cluster."""
    rng = np.random.default_rng(seed)
    means = np.zeros((3, d))
    means[0, 0], means[1, 1], means[2, :2] = 5.0, 5.0, -5.0
    truth = rng.integers(0, 3, n)
    return (means[truth] + rng.normal(scale=0.6, size=(n, d))).astype(np.float32), truth


def linear_model(d: int, box: int = 8, apix: float = 3.0) -> LinearModel:
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(box ** 3, d)))
    return LinearModel(rng.normal(size=(box,) * 3), q.T.reshape(d, box, box, box), np.ones(d), apix)


def analytic(model: LinearModel, z: np.ndarray) -> np.ndarray:
    return model.mean + np.tensordot(np.asarray(z, np.float32), model.components, axes=(0, 0))


def train_run(folder: Path, z: np.ndarray, model: LinearModel | None = None, star: Path | None = None) -> Path:
    """A finished heterogeneity run folder: latents.npy (+ model.npz, particles.star with cryohetZ columns)."""
    folder.mkdir(parents=True)
    rec = RunRecord(method="train-linear", params={})
    np.save(folder / "latents.npy", z)
    rec.add("latents", "latents.npy", folder, "latent coordinates")
    if model is not None:
        model.save(folder / "model.npz")
        rec.add("model", "model.npz", folder, "principal volumes", model_type="linear")
    if star is not None:
        pset = load_particles(star, require_poses=False)
        write_particles_star(folder / "particles.star", pset,
                             extra_columns={f"cryohetZ{i + 1}": z[:, i] for i in range(z.shape[1])})
        rec.add("particles_star", "particles.star", folder, "particles with latents")
    rec.status = "finished"
    rec.write(folder)
    return folder


def outputs(run_dir: Path, kind: str) -> list:
    return read_record(run_dir).of_kind(kind)


# ------------------------------------------------------------------------------------------------ analyze


def test_analyze_layout_maps_plots_and_record(tmp_path) -> None:
    z, truth = latents_with_clusters(400, 3)
    model = linear_model(3)
    run = train_run(tmp_path / "train", z, model)
    out = tmp_path / "analyze"
    run_method(ANALYZE, {"run": run, "ksample": 3, "pcs": 2, "n_frames": 4, "umap_max_points": 300}, out)

    # k-means: labels recover the clusters, centres are on-data rows, maps at them equal the model's
    labels = np.load(out / "kmeans3" / "labels.npy")
    assert labels.shape == (400,) and adjusted_rand_score(truth, labels) > 0.97
    ind = np.loadtxt(out / "kmeans3" / "centers_ind.txt", dtype=int)
    centers = np.loadtxt(out / "kmeans3" / "centers.txt")
    assert np.allclose(centers, z[ind], atol=1e-5)
    for i in range(3):
        vol, apix = read_map(out / "kmeans3" / f"vol_{i:03d}.mrc")
        assert apix == pytest.approx(3.0) and np.allclose(vol, analytic(model, z[ind[i]]), atol=1e-4)

    # PC traversals: 5th to 95th percentile of the PC coordinate, maps X0 + z·X
    pca = np.load(out / "pca.npy")
    assert pca.shape == (400, 3)
    for pc in (1, 2):
        zs = np.loadtxt(out / f"pc{pc}" / "z_values.txt")
        assert zs.shape == (4, 3)
        for i in range(4):
            assert np.allclose(read_map(out / f"pc{pc}" / f"vol_{i:03d}.mrc")[0], analytic(model, zs[i]), atol=1e-4)
    series = [o for o in outputs(out, "volume_series") if o.meta["series"] == "pc1"]
    assert [o.path for o in series] == [f"pc1/vol_{i:03d}.mrc" for i in range(4)]
    assert [o.meta["pc_value"] for o in series][::3] == pytest.approx(np.percentile(pca[:, 0], [5, 95]), abs=1e-4)
    assert not (out / "pc3").exists()

    # UMAP: d = 3 > 2, fitted on 300 of 400 and the rest placed; every particle has finite coordinates
    emb = np.load(out / "umap.npy")
    assert emb.shape == (400, 2) and np.isfinite(emb).all()
    assert adjusted_rand_score(truth, labels) > 0.97

    # record: latents (pca, umap, labels), one volume_series output per map, chimerax, plots
    content = {o.meta["content"]: o for o in outputs(out, "latents")}
    assert set(content) == {"pca", "umap", "kmeans_labels"}
    assert content["kmeans_labels"].path == "kmeans3/labels.npy" and content["kmeans_labels"].meta["k"] == 3
    assert content["kmeans_labels"].meta["center_indices"] == ind.tolist()
    assert content["umap"].meta["fitted_on"] == 300
    assert len(outputs(out, "volume_series")) == 3 + 4 + 4
    cxc = {o.path for o in outputs(out, "chimerax")}
    assert cxc == {"kmeans3/kmeans3.cxc", "pc1/pc1.cxc", "pc2/pc2.cxc"}
    text = (out / "kmeans3" / "kmeans3.cxc").read_text()
    assert "open vol_000.mrc vol_001.mrc vol_002.mrc vseries true" in text
    pngs = [o.path for o in outputs(out, "plot")]
    assert {"pca.png", "pca_density.png", "umap.png", "umap_density.png", "kmeans3/pca.png", "kmeans3/umap.png",
            "pc1/pca.png", "pc2/pca.png"} <= set(pngs)
    for p in pngs:
        assert (out / p).read_bytes()[:8] == PNG_MAGIC
    assert read_record(out).status == "finished"


def test_analyze_skips_umap_in_two_dimensions(tmp_path) -> None:
    z, _ = latents_with_clusters(200, 2)
    run = train_run(tmp_path / "train", z)  # no model: --volumes no
    out = tmp_path / "an"
    run_method(ANALYZE, {"run": run, "ksample": 4, "volumes": False, "pc_on_data": True}, out)
    assert not (out / "umap.npy").exists() and not list(out.rglob("*.mrc"))
    # on-data PC traversal: every point is a particle's latent
    zs = np.loadtxt(out / "pc1" / "z_values.txt")
    assert zs.shape == (10, 2)
    assert all(np.abs(z - p).max(axis=1).min() < 1e-5 for p in zs)
    assert "UMAP: skipped, the latent space has 2 dimension(s)" in (out / "run.log").read_text()
    assert np.load(out / "kmeans4" / "labels.npy").max() == 3
    assert (out / "pca.png").read_bytes()[:8] == PNG_MAGIC
    # maps asked for but the run holds no model
    with pytest.raises(InputError, match="no model of the volumes"):
        run_method(ANALYZE, {"run": run, "ksample": 2}, tmp_path / "an2")


# ------------------------------------------------------------------------------------------------ eval-volume


def test_eval_volume_at_points_and_along_a_path(tmp_path) -> None:
    model = linear_model(3)
    run = train_run(tmp_path / "train", np.zeros((5, 3), np.float32), model)

    out1 = tmp_path / "one"
    run_method(EVAL, {"run": run, "z": "0.5,-1,2"}, out1)
    (vol_out,) = outputs(out1, "volume")
    vol, apix = read_map(out1 / vol_out.path)
    assert vol_out.path == "vol_000.mrc" and apix == pytest.approx(3.0)
    assert np.allclose(vol, analytic(model, [0.5, -1, 2]), atol=1e-4)

    out2 = tmp_path / "path"
    run_method(EVAL, {"run": run, "z": "0,0,0", "z_end": "1,2,-2", "n_frames": 3}, out2)
    maps = [o.path for o in outputs(out2, "volume_series")]
    assert maps == ["vol_000.mrc", "vol_001.mrc", "vol_002.mrc"]
    assert np.allclose(read_map(out2 / "vol_001.mrc")[0], analytic(model, [0.5, 1, -1]), atol=1e-4)
    assert "open vol_000.mrc vol_001.mrc vol_002.mrc vseries true" in (out2 / "volumes.cxc").read_text()

    zfile = tmp_path / "z.txt"
    zfile.write_text("0 0 1\n1 0 0\n")
    out3 = tmp_path / "file"
    run_method(EVAL, {"run": run, "z_file": zfile}, out3)
    assert np.allclose(read_map(out3 / "vol_001.mrc")[0], analytic(model, [1, 0, 0]), atol=1e-4)

    with pytest.raises(ValueError, match="model's latent space has 3"):
        run_method(EVAL, {"run": run, "z": "1,2"}, tmp_path / "bad")
    with pytest.raises(ValueError, match="exactly one of --z and --z_file"):
        run_method(EVAL, {"run": run}, tmp_path / "bad2")
    with pytest.raises(InputError, match="no run record"):
        run_method(EVAL, {"run": tmp_path / "nowhere", "z": "0,0,0"}, tmp_path / "bad3")


# ------------------------------------------------------------------------------------------------ select


@pytest.fixture()
def toy_run(tmp_path, monkeypatch) -> tuple[Path, np.ndarray, Path]:
    """A run on a copy of the toy stack (1000 particles of 30 px); the working folder is the data folder,
    as RELION's project folder, so the STAR's relative image names stay as they were."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("toy_projections.star", "toy_projections.mrcs"):
        shutil.copy(THIRDPARTY / name, data / name)
    monkeypatch.chdir(data)
    z, _ = latents_with_clusters(1000, 3, seed=2)
    run = train_run(data / "train", z, star=data / "toy_projections.star")
    return run, z, data


def original_names(data: Path) -> np.ndarray:
    return starfile.read(data / "toy_projections.star")["rlnImageName"].to_numpy()


def check_star(path: Path, rows: np.ndarray, z: np.ndarray, data: Path) -> None:
    """The STAR holds exactly ``rows`` of the run, in order, pointing at the original images; RELION reads it."""
    parts = starfile.read(path)["particles"]
    assert np.array_equal(parts["rlnImageName"].to_numpy(), original_names(data)[rows])
    assert np.allclose(parts["cryohetZ1"].to_numpy(), z[rows, 0], atol=1e-5)
    relion("relion_star_handler", "--i", str(path), "--o", str(path.with_name(path.stem + "_copy.star")), cwd=data)
    assert len(starfile.read(path.with_name(path.stem + "_copy.star"))["particles"]) == len(rows)
    relion("relion_image_handler", "--i", str(path), "--stats", cwd=data)


def test_select_by_cluster_writes_relion_subsets(toy_run) -> None:
    run, z, data = toy_run
    an = data / "analyze"
    run_method(ANALYZE, {"run": run, "ksample": 3, "volumes": False, "umap": False}, an)
    labels = np.load(an / "kmeans3" / "labels.npy")
    # the clusters as RELION classes: the run's particles with rlnClassNumber = cluster + 1; RELION splits by it
    (classes,) = [o for o in outputs(an, "particles_star") if o.meta.get("content") == "classes"]
    check_star(an / classes.path, np.arange(len(z)), z, data)
    assert starfile.read(an / classes.path)["particles"]["rlnClassNumber"].tolist() == (labels + 1).tolist()
    relion("relion_star_handler", "--i", str(an / classes.path), "--o", str(data / "class2.star"),
           "--select", "rlnClassNumber", "--minval", "2", "--maxval", "2", cwd=data)
    assert len(starfile.read(data / "class2.star")["particles"]) == int((labels == 1).sum())
    out = data / "sel"
    run_method(SELECT, {"analysis": an, "clusters": "0,2"}, out)  # the analysed run is found from the analysis
    rows = np.flatnonzero(np.isin(labels, [0, 2]))
    check_star(out / "particles_selected.star", rows, z, data)
    check_star(out / "particles_rest.star", np.flatnonzero(labels == 1), z, data)
    assert np.loadtxt(out / "selected_indices.txt", dtype=int).tolist() == rows.tolist()
    stars = {o.path: o for o in outputs(out, "particles_star")}
    assert set(stars) == {"particles_selected.star", "particles_rest.star"}
    assert stars["particles_selected.star"].meta["n_particles"] == len(rows)
    assert stars["particles_selected.star"].meta["clusters"] == [0, 2]
    # its cryoSPARC twin, named in the record: the same particles and latents (3D Variability's fields)
    from cryosparc.dataset import Dataset

    assert stars["particles_selected.star"].meta["cs"] == "particles_selected.cs"
    twin = Dataset.load(out / "particles_selected.cs")
    assert len(twin) == len(rows) and np.allclose(twin["components_mode_0/value"], z[rows, 0], atol=1e-5)
    assert [Path(p).name for p in twin["blob/path"]] == [Path(n.split("@")[1]).name
                                                          for n in original_names(data)[rows]]

    with pytest.raises(ValueError, match="cluster 3 does not exist"):
        run_method(SELECT, {"analysis": an, "clusters": "3"}, data / "bad")
    # PC region with the analysis' PCA coordinates
    out2 = data / "sel_pc"
    run_method(SELECT, {"run": run, "analysis": an, "region": "pc1:0:"}, out2)
    pca = np.load(an / "pca.npy")
    assert np.loadtxt(out2 / "selected_indices.txt", dtype=int).tolist() == np.flatnonzero(pca[:, 0] >= 0).tolist()


def test_select_by_region_and_indices(toy_run) -> None:
    run, z, data = toy_run
    out = data / "box"
    run_method(SELECT, {"run": run, "region": "z1:0:10,z2:-1:", "write_rest": False}, out)
    rows = np.flatnonzero((z[:, 0] >= 0) & (z[:, 0] <= 10) & (z[:, 1] >= -1))
    check_star(out / "particles_selected.star", rows, z, data)
    assert not (out / "particles_rest.star").exists()

    out = data / "ellipse"
    run_method(SELECT, {"run": run, "region": "z1:4:6,z2:-1:1", "region_shape": "ellipse"}, out)
    rows = np.flatnonzero((z[:, 0] - 5) ** 2 + z[:, 1] ** 2 <= 1)
    assert np.loadtxt(out / "selected_indices.txt", dtype=int, ndmin=1).tolist() == rows.tolist()

    idx = data / "rows.txt"
    idx.write_text("999 0 5\n")
    out = data / "idx"
    run_method(SELECT, {"run": run, "indices": idx}, out)
    check_star(out / "particles_selected.star", np.array([0, 5, 999]), z, data)
    out = data / "inv"
    run_method(SELECT, {"run": run, "indices": idx, "invert": True}, out)
    assert np.loadtxt(out / "selected_indices.txt", dtype=int).tolist() == sorted(set(range(1000)) - {0, 5, 999})
    # criteria given together must all hold
    out = data / "both"
    thr = float(np.sort(z[[0, 5, 999], 1])[1])
    run_method(SELECT, {"run": run, "indices": idx, "region": f"z1:-100:100,z2:{thr!r}:"}, out)
    expected = [i for i in (0, 5, 999) if z[i, 1] >= thr]
    assert len(expected) == 2
    assert np.loadtxt(out / "selected_indices.txt", dtype=int, ndmin=1).tolist() == expected


def test_select_rejects_bad_input(toy_run) -> None:
    run, z, data = toy_run
    bad = data / "bad_rows.txt"
    bad.write_text("0 1000\n")
    with pytest.raises(InputError, match=r"bad_rows\.txt.*row index 1000 is out of range"):
        run_method(SELECT, {"run": run, "indices": bad}, data / "o1")
    with pytest.raises(ValueError, match="empty selection"):
        run_method(SELECT, {"run": run, "region": "z1:100:200"}, data / "o2")
    with pytest.raises(ValueError, match="at least one of --clusters, --region, --indices, --max_fit_z"):
        run_method(SELECT, {"run": run}, data / "o3")
    with pytest.raises(ValueError, match="--clusters needs --analysis"):
        run_method(SELECT, {"run": run, "clusters": "0"}, data / "o4")
    with pytest.raises(ValueError, match="UMAP coordinates"):
        run_method(SELECT, {"run": run, "region": "umap1:0:1"}, data / "o5")
    # a run folder without particles (indices and fit cuts need only its particles STAR)
    empty = data / "empty_run"
    empty.mkdir()
    RunRecord(method="reconstruct", params={}, status="finished").write(empty)
    with pytest.raises(InputError, match="holds no particles STAR"):
        run_method(SELECT, {"run": empty, "indices": bad}, data / "o6")
    assert read_record(data / "o6").status == "failed"
    # a run without latents (its particles STAR only): a region needs latents
    star_only = data / "star_only_run"
    star_only.mkdir()
    write_particles_star(star_only / "particles.star", load_particles(particles_star_path(run), require_poses=False))
    rec = RunRecord(method="reconstruct", params={}, status="finished")
    rec.add("particles_star", "particles.star", star_only)
    rec.write(star_only)
    with pytest.raises(InputError, match="no latent coordinates"):
        run_method(SELECT, {"run": star_only, "region": "z1:0:1"}, data / "o7")
