"""Latent-space analysis: PCA, k-means (on-data centres), PC traversals, maps, regions, plots, ChimeraX scripts.

Library-level tests on synthetic latents with known structure and a linear toy model of the volumes whose maps
are known analytically (X0 + Σ z_k X_k).
"""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.metrics import adjusted_rand_score

from cryohet.analysis import latent, plots
from cryohet.analysis.select import (
    AxisRange,
    cluster_mask,
    parse_clusters,
    parse_region,
    read_indices,
    region_mask,
)
from cryohet.analysis.volumes import (
    contour_level,
    parse_z,
    read_z_file,
    write_chimerax_script,
    write_volume_series,
)
from cryohet.errors import InputError
from cryohet.io.mrc import read_map

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ToyLinear:
    """A linear model of the volumes, V(z) = X0 + Σ_k z_k X_k (a real VolumeModel, 8³ maps)."""

    def __init__(self, d: int, box: int = 8, apix: float = 2.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.latent_dim, self.box, self.apix = d, box, apix
        self.x0 = rng.normal(size=(box, box, box)).astype(np.float32)
        self.xk = rng.normal(size=(d, box, box, box)).astype(np.float32)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(z).astype(np.float32)
        return self.x0[None] + np.einsum("md,dxyz->mxyz", z, self.xk)


def clustered_latents(n_per: int = 100, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian clusters in d dimensions: (z (3·n_per, d), true labels)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((3, d))
    means[0, 0], means[1, 1], means[2, :2] = 6.0, 6.0, -6.0
    truth = np.repeat(np.arange(3), n_per)
    z = means[truth] + rng.normal(scale=0.7, size=(len(truth), d))
    perm = rng.permutation(len(truth))
    return z[perm].astype(np.float32), truth[perm]


def test_pca_recovers_known_axes() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    z = rng.normal(size=(4000, 3)) * np.array([5.0, 2.0, 0.5]) @ q.T + np.array([1.0, -2.0, 3.0])
    res = latent.pca(z)
    # each component is the matching rotated axis (up to sign), variances in decreasing order
    assert np.allclose(np.abs(np.sum(res.components * q.T, axis=1)), 1.0, atol=0.01)
    assert np.allclose(res.explained_variance, [25.0, 4.0, 0.25], rtol=0.08)
    assert np.isclose(res.explained_variance_ratio.sum(), 1.0)
    assert np.allclose(res.mean, [1.0, -2.0, 3.0], atol=0.2)
    coords = res.transform(z)
    assert np.allclose(res.inverse_transform(coords), z, atol=1e-8)
    assert np.allclose(np.cov(coords.T), np.diag(res.explained_variance), atol=1e-6)
    # deterministic sign: the largest entry of each component is positive
    assert np.all(res.components[np.arange(3), np.argmax(np.abs(res.components), axis=1)] > 0)
    with pytest.raises(ValueError, match="n_components"):
        latent.pca(z, n_components=4)
    with pytest.raises(ValueError, match="non-finite"):
        latent.pca(np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_kmeans_recovers_clusters_with_on_data_centres() -> None:
    z, truth = clustered_latents()
    km = latent.kmeans(z, 3, seed=0)
    assert adjusted_rand_score(truth, km.labels) > 0.98
    # on-data: each centre is an actual particle latent, the one nearest the k-means mean
    assert np.array_equal(km.centers, z[km.center_indices].astype(np.float64))
    brute = np.argmin(((z[:, None, :] - km.raw_centers[None]) ** 2).sum(-1), axis=0)
    assert np.array_equal(km.center_indices, brute)
    assert np.array_equal(km.labels[km.center_indices], np.arange(3))
    assert len(set(truth[km.center_indices])) == 3
    with pytest.raises(ValueError, match="number of clusters"):
        latent.kmeans(z[:2], 3)


def test_nearest_rows_in_chunks_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    z, pts = rng.normal(size=(1000, 5)), rng.normal(size=(17, 5))
    brute = np.argmin(((z[:, None] - pts[None]) ** 2).sum(-1), axis=0)
    assert np.array_equal(latent.nearest_rows(z, pts, chunk=64), brute)


def test_pc_traversal_maps_equal_the_linear_model(tmp_path) -> None:
    z, _ = clustered_latents(d=3)
    pcs = latent.pca(z)
    pts, vals = latent.pc_traversal(z, pcs, 0, n_frames=10)
    coord = pcs.transform(z)[:, 0]
    assert np.allclose(vals[[0, -1]], np.percentile(coord, [5, 95]))
    assert np.allclose(np.diff(vals), vals[1] - vals[0])
    assert np.allclose(pts, pcs.mean + vals[:, None] * pcs.components[0])
    # the other PC coordinates are 0 along the traversal
    assert np.allclose(pcs.transform(pts)[:, 1:], 0.0, atol=1e-9)

    model = ToyLinear(3)
    series = write_volume_series(model, pts, tmp_path / "pc1")
    assert [f.name for f in series.files] == [f"vol_{i:03d}.mrc" for i in range(10)]
    for f, p in zip(series.files, pts.astype(np.float32)):
        vol, apix = read_map(f)
        expected = model.x0 + sum(p[k] * model.xk[k] for k in range(3))
        assert np.allclose(vol, expected, atol=1e-4)
        assert apix == pytest.approx(2.5)
    assert series.level == pytest.approx(np.median([contour_level(read_map(f)[0]) for f in series.files]))
    with pytest.raises(ValueError, match="PC 4 does not exist"):
        latent.pc_traversal(z, pcs, 3)


def test_progress_is_called_and_model_dimension_checked(tmp_path) -> None:
    seen = []

    def progress(items, desc, total=None):
        seen.append((desc, total))
        return items

    series = write_volume_series(ToyLinear(2), np.zeros((5, 2)), tmp_path, progress=progress, desc="maps", batch=2)
    assert seen == [("maps", 3)] and len(series.files) == 5
    with pytest.raises(ValueError, match="the model expects 2"):
        write_volume_series(ToyLinear(2), np.zeros((1, 3)), tmp_path)


def test_parse_z_and_z_file(tmp_path) -> None:
    assert np.allclose(parse_z("0.1,-2"), [[0.1, -2.0]])
    assert np.allclose(parse_z("0 0; 1e-1, 2", 2), [[0, 0], [0.1, 2]])
    with pytest.raises(ValueError, match="--z: points have 2 value"):
        parse_z("1,2", 3)
    with pytest.raises(ValueError, match="not a list of numbers"):
        parse_z("1,a")
    (tmp_path / "z.txt").write_text("# two points\n0.5 1\n2,3\n")
    assert np.allclose(read_z_file(tmp_path / "z.txt", 2), [[0.5, 1], [2, 3]])
    np.save(tmp_path / "z.npy", np.array([1.0, 2.0, 3.0]))
    assert read_z_file(tmp_path / "z.npy", 3).shape == (1, 3)
    with pytest.raises(InputError, match="z.npy"):
        read_z_file(tmp_path / "z.npy", 2)
    with pytest.raises(InputError, match="not found"):
        read_z_file(tmp_path / "none.txt")


def test_region_syntax_and_masks() -> None:
    terms = parse_region("pc1:-1:1, z2::0.5,umap1:0:")
    assert terms == [AxisRange("pc", 0, -1.0, 1.0), AxisRange("z", 1, -np.inf, 0.5), AxisRange("umap", 0, 0.0, np.inf)]
    assert ",".join(map(str, terms)) == "pc1:-1:1,z2::0.5,umap1:0:"
    x = np.array([[0.0, 0.0], [0.9, 0.9], [1.0, -2.0], [1.5, 0.0], [-0.5, 0.4]])
    box = region_mask(parse_region("z1:-1:1,z2:-2:1"), {"z": x})
    assert box.tolist() == [True, True, True, False, True]
    # ellipse inscribed in the box [-1,1]×[-2,2]: (x/1)² + (y/2)² <= 1
    ell = region_mask(parse_region("z1:-1:1,z2:-2:2"), {"z": x}, "ellipse")
    assert ell.tolist() == [True, False, False, False, True]
    for bad, msg in [("pc1:1:-1", "must not exceed"), ("pc0:0:1", "N >= 1"), ("foo1:0:1", "pcN, zN or umapN"),
                     ("pc1:0", "<axis>:<low>:<high>"), ("pc1:a:1", "not numbers"), ("pc1:0:1,pc1:0:2", "twice"),
                     ("", "empty region")]:
        with pytest.raises(ValueError, match=msg):
            parse_region(bad)
    with pytest.raises(ValueError, match="z3 does not exist"):
        region_mask(parse_region("z3:0:1"), {"z": x})
    with pytest.raises(ValueError, match="--analysis"):
        region_mask(parse_region("umap1:0:1"), {"z": x})
    with pytest.raises(ValueError, match="both bounds"):
        region_mask(parse_region("z1::1"), {"z": x}, "ellipse")


def test_clusters_and_indices(tmp_path) -> None:
    labels = np.array([0, 1, 2, 1, 0, 3])
    assert parse_clusters("1, 3", 4) == [1, 3]
    assert np.flatnonzero(cluster_mask(labels, [1, 3])).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="cluster 4 does not exist"):
        parse_clusters("0,4", 4)
    (tmp_path / "i.txt").write_text("5\n1, 3 # comment\n3\n")
    assert read_indices(tmp_path / "i.txt", 6).tolist() == [1, 3, 5]
    np.save(tmp_path / "i.npy", np.array([4, 0]))
    assert read_indices(tmp_path / "i.npy", 6).tolist() == [0, 4]
    np.save(tmp_path / "m.npy", labels == 1)
    assert read_indices(tmp_path / "m.npy", 6).tolist() == [1, 3]
    (tmp_path / "bad.txt").write_text("0 6\n")
    with pytest.raises(InputError, match=r"bad\.txt.*row index 6 is out of range"):
        read_indices(tmp_path / "bad.txt", 6)
    (tmp_path / "frac.txt").write_text("0 1.5\n")
    with pytest.raises(InputError, match="integers"):
        read_indices(tmp_path / "frac.txt", 6)


def test_chimerax_script_names_the_maps(tmp_path) -> None:
    series = write_volume_series(ToyLinear(2), np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), tmp_path / "pc1")
    cxc = write_chimerax_script(tmp_path / "pc1" / "pc1.cxc", series.files, series.level, title="PC1")
    text = cxc.read_text()
    assert "open vol_000.mrc vol_001.mrc vol_002.mrc vseries true" in text
    assert f"level {series.level:.6g}" in text and "vseries slider #1" in text
    opened = text.split("open ", 2)[2].split(" vseries")[0].split()
    assert all((cxc.parent / name).is_file() for name in opened)


def test_plots_are_valid_png(tmp_path) -> None:
    z, truth = clustered_latents()
    paths = [plots.scatter_plot(z[:, :2], tmp_path / "a.png", xlabel="PC1", ylabel="PC2"),
             plots.scatter_plot(z[:, :2], tmp_path / "b.png", labels=truth, centers=z[:3, :2]),
             plots.density_plot(z[:, :2], tmp_path / "c.png"),
             plots.scatter_plot(z[:, 0], tmp_path / "d.png", labels=truth)]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not a blank canvas
