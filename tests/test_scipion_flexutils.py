"""Scipion's flexibility tools take cryohet's particles with latent coordinates (SetOfParticlesFlex).

scipion-em-flexutils and scipion-em-cryodrgn (PyPI, in the Scipion-pinned environment) are run on the particles
that cryohet's ``principal-volumes`` and ``train-vae`` protocols register, in a real project:

* flexutils' PCA filtering of a conformational space (``ProtFlexFilterPCA``) and its association of a flex space
  with another set of particles (``ProtFlexAssociateSpace``) run in Scipion's own python and are checked against
  the engine's latents;
* cryoDRGN's subset protocol (``CryoDrgnProtSubset``: particles picked by an index file, as cryoDRGN's notebooks
  write it) makes a subset of our particles that keeps their latents;
* flexutils' dimensionality reduction (``ProtFlexDimRedSpace``) accepts our particles (its validation passes), but
  its programs live in flexutils' own conda environments (``flexutils``, ``flexutils-tensorflow``, made by
  ``scipion3 installb flexutils`` with conda from GitHub's Flexutils-Scripts), which this machine does not have:
  the run fails at the conda activation, which the test checks, so that what did not run is stated by a test.
  Its clustering (``ProtFlexOptimalClusters``) and annotation (``ProtFlexAnnotateSpace``) run programs from the
  same environments.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from pwem.objects import SetOfParticlesFlex
from pyworkflow.plugin import Domain
from scipion_tools import launch, new_project, simulate
from sklearn.decomposition import PCA

from cryohet_plugin.protocols import CryohetProtPrincipalVolumes, CryohetProtTrainVae

N_PARTICLES = 200
#: The engine's per-particle latents of each method (its run record's ``latents`` output).
LATENTS = {"principal-volumes": "latents.npy", "train-vae": "z.npy"}
flexutils = Domain.importFromPlugin("flexutils.protocols", doRaise=True)
CryoDrgnProtSubset = Domain.importFromPlugin("cryodrgn.protocols", "CryoDrgnProtSubset", doRaise=True)


@pytest.fixture(scope="module")
def project():
    with new_project("flexutils") as proj:
        yield proj


@pytest.fixture(scope="module")
def simulated(project):
    return simulate(project, N_PARTICLES)


@pytest.fixture(scope="module", params=["principal-volumes", "train-vae"])
def flex_run(request, project, simulated):
    """(protocol, its SetOfParticlesFlex, the engine's latents in the particles' order)."""
    parts = simulated.outputParticles
    if request.param == "principal-volumes":
        prot = project.newProtocol(CryohetProtPrincipalVolumes, particles=parts, n_components=3, resolution_A=12.0,
                                   max_iter=2, movie_frames=3, useGpu=False, numberOfThreads=2)
    else:
        prot = project.newProtocol(CryohetProtTrainVae, particles=parts, zdim=4, epochs=2, enc_dim=32, dec_dim=32,
                                   useGpu=False, numberOfThreads=2)
    prot = launch(project, prot)
    flex = prot.outputParticlesFlex
    z = np.load(prot._getExtraPath("cryohet", LATENTS[request.param]))
    return prot, flex, z


def _z(particles) -> np.ndarray:
    return np.array([p.getZFlex() for p in particles.iterItems(orderBy="id")])


def test_flexutils_pca_filter_runs_on_our_latents(project, flex_run):
    """ProtFlexFilterPCA keeps the first two principal components of our latent space: its output equals sklearn's
    PCA reconstruction of the engine's latents, particle by particle."""
    _, flex, z = flex_run
    assert isinstance(flex, SetOfParticlesFlex) and flex.getSize() == N_PARTICLES
    np.testing.assert_allclose(_z(flex), z, rtol=1e-5, atol=1e-6)
    prot = launch(project, project.newProtocol(flexutils.ProtFlexFilterPCA, particles=flex, keepPCA="1,2"))
    out = prot.outputParticles
    assert isinstance(out, SetOfParticlesFlex) and out.getSize() == N_PARTICLES
    pca = PCA(n_components=z.shape[1]).fit(z)
    scores = pca.transform(z)
    scores[:, 2:] = 0
    np.testing.assert_allclose(_z(out), pca.inverse_transform(scores), rtol=1e-4, atol=1e-5)
    assert out.getFlexInfo().getProgName() == flex.getFlexInfo().getProgName()
    assert any("Total variance explained" in line for line in prot.summary())


def test_flexutils_associates_our_space_with_other_particles(project, simulated, flex_run):
    _, flex, z = flex_run
    prot = launch(project, project.newProtocol(flexutils.ProtFlexAssociateSpace, particlesFlex=flex,
                                               particles=simulated.outputParticles))
    out = prot.flexParticles
    assert out.getSize() == N_PARTICLES
    np.testing.assert_allclose(_z(out), z, rtol=1e-5, atol=1e-6)
    locations = [p.getLocation() for p in simulated.outputParticles.iterItems(orderBy="id")]
    assert [p.getLocation() for p in out.iterItems(orderBy="id")] == locations


def test_cryodrgn_subset_of_our_particles_keeps_their_latents(project, flex_run, tmp_path):
    """cryoDRGN's subset protocol on our particles, with indices as cryoDRGN's filtering notebook saves them."""
    _, flex, z = flex_run
    keep = np.flatnonzero(z[:, 0] > np.median(z[:, 0]))
    index_file = tmp_path / "ind_selected.pkl"
    with open(index_file, "wb") as fh:
        pickle.dump(keep, fh)
    prot = launch(project, project.newProtocol(CryoDrgnProtSubset, inputParticles=flex, pklFile=str(index_file)))
    out = prot.Particles
    assert isinstance(out, SetOfParticlesFlex) and out.getSize() == len(keep)
    np.testing.assert_allclose(_z(out), z[keep], rtol=1e-5, atol=1e-6)
    assert all(p.getCTF() is not None and p.getTransform() is not None for p in out.iterItems())


def test_flexutils_dimred_accepts_our_particles_but_needs_its_conda_environment(project, flex_run):
    _, flex, _ = flex_run
    prot = project.newProtocol(flexutils.ProtFlexDimRedSpace, particles=flex, mode=1, dimensions=3, useGpu=False)
    assert prot.validate() == []  # our particles fit its form: latent dimension >= 3 and a SetOfParticlesFlex
    prot = launch(project, prot, ok=False)
    assert prot.isFailed()
    log = " ".join(Path(f).read_text() for f in prot.getLogPaths() if os.path.exists(f))
    assert "conda activate flexutils" in log and "dimensionality_reduction.py" in log, log[-2000:]
