"""The plugin's figures (matplotlib Agg, no display) and the Scipion viewer for particles with latents."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from matplotlib.image import imread
from pwem.objects import ParticleFlex, SetOfParticlesFlex
from pyworkflow.project import Manager

from cryohet_plugin.viewers import CryohetFlexViewer, PngView, plots


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_latent_plots_render(tmp_path, dim):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, dim)) + (np.arange(400) % 2)[:, None] * 3  # two clusters
    scatter = plots.latent_scatter(z, tmp_path / "s.png", color=z[:, 0])
    density = plots.latent_density(z, tmp_path / "d.png")
    for f in (scatter, density):
        img = imread(f)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.05  # something was drawn


def test_pca_projection_orders_by_variance():
    rng = np.random.default_rng(1)
    z = np.column_stack([rng.normal(0, 5, 500), rng.normal(0, 1, 500), rng.normal(0, 0.1, 500)])
    xy, labels = plots.project_2d(z)
    assert xy.shape == (500, 2) and labels[0].startswith("PC1")
    assert xy[:, 0].std() > 3 * xy[:, 1].std()


def test_fsc_plot_and_resolution(tmp_path):
    freq = np.linspace(0, 0.25, 51)
    curve = 1 / (1 + np.exp((freq - 0.1) / 0.01))  # crosses 0.143 near 0.118 1/Å
    assert 8.0 < plots.resolution_at(freq, curve) < 9.0
    png = plots.fsc_plot(freq, {"masked": curve, "unmasked": curve * 0.9}, tmp_path / "fsc.png")
    assert imread(png).shape[0] > 200


def test_chimerax_series_script(tmp_path):
    maps = [str(tmp_path / f"state_{i:03d}.mrc") for i in range(3)]
    cxc = plots.chimerax_series(maps, tmp_path / "series.cxc", level=0.02, apix=2.0)
    text = open(cxc).read()
    assert text.count(".mrc") == 3 and "vseries true" in text and "vseries play #1" in text
    assert "level 0.02" in text and "voxelSize 2" in text


def test_flex_viewer_renders_particles_with_latents(tmp_path):
    cwd = os.getcwd()
    proj = Manager().createProject(f"cryohet_view_{uuid.uuid4().hex[:8]}")
    os.chdir(proj.path)  # viewers write into the project's Tmp/, as in a Scipion session
    try:
        parts = SetOfParticlesFlex(filename=str(tmp_path / "flex.sqlite"), progName="CryoHet")
        rng = np.random.default_rng(2)
        for i in range(1, 101):
            p = ParticleFlex(progName="CryoHet")
            p.setLocation(i, "stack.mrcs")
            p.setZFlex(rng.normal(size=3).tolist())
            p.setObjId(i)
            parts.append(p)
        parts.write()
        viewer = CryohetFlexViewer(project=proj)
        files = viewer.render(parts, str(tmp_path / "plots"))
        assert len(files) == 2 and all(os.path.getsize(f) > 1000 for f in files)
        views = viewer._visualize(parts)
        assert isinstance(views[0], PngView) and len(views[0].getPaths()) == 2
    finally:
        os.chdir(cwd)
