"""Scipion's flexibility tools take cryohet's particles with latent coordinates (SetOfParticlesFlex).

scipion-em-flexutils and scipion-em-cryodrgn (PyPI, in the Scipion-pinned environment through the ``scipion``
extra) are run on the particles that cryohet's ``principal-volumes`` and ``train-vae`` protocols register, in a
real project (docs/hosts.md, *Scipion's flexibility tools*):

* what runs in Scipion's own python runs to its end and is checked against the engine's latents: flexutils'
  PCA filtering of a conformational space (``ProtFlexFilterPCA``), its association of a flex space with another
  particle set (``ProtFlexAssociateSpace``), cryoDRGN's subset (``CryoDrgnProtSubset``, an index file as
  cryoDRGN's notebooks write it), whose output flexutils, RELION and cryohet's latent viewer take in turn;
* flexutils' dimensionality reduction (``ProtFlexDimRedSpace``), optimal-cluster search
  (``ProtFlexOptimalClusters``) and landscape scoring (``ProtFlexScoreLandscape``) run their programs from
  flexutils' own conda environments (``flexutils``, ``flexutils-tensorflow``: ``scipion3 installb flexutils``
  builds them with conda from GitHub, nothing a pip extra can install), and cryoDRGN's training from cryoDRGN's
  (``cryodrgn-3.4.4``). Each of them is run: it validates our particles, writes its program's input from them
  (checked: our latents, or our particles' STAR), and stops where the shell finds no ``conda`` (exit 127), so
  that what did not run, and where, is stated by a test;
* flexutils' annotation (``ProtFlexAnnotateSpace``) refuses, in its validation, particles without reduced
  coordinates (``zRed``, which only its dimensionality reduction writes);
* the viewers: Scipion lists flexutils' table view (metadata mode) and cryohet's latent view for our particles,
  and flexutils' class viewer for the classes of cryohet's ``analyze``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from emtable import Table
from pwem.objects import SetOfParticlesFlex
from pwem.viewers import DataViewer
from pyworkflow.plugin import Domain
from pyworkflow.viewer import DESKTOP_TKINTER
from scipion_tools import launch, new_project, simulate
from sklearn.decomposition import PCA

from cryohet_plugin.protocols import CryohetProtAnalyze, CryohetProtPrincipalVolumes, CryohetProtTrainVae
from cryohet_plugin.viewers import CryohetFlexViewer

N_PARTICLES = 200
#: The engine's per-particle latents of each method (its run record's ``latents`` output).
LATENTS = {"principal-volumes": "latents.npy", "train-vae": "z.npy"}
flexutils = Domain.importFromPlugin("flexutils.protocols", doRaise=True)
FlexDataViewer = Domain.importFromPlugin("flexutils.viewers", "FlexDataViewer", doRaise=True)
cryodrgn = Domain.importFromPlugin("cryodrgn.protocols", doRaise=True)
ProtRelionReconstruct = Domain.importFromPlugin("relion.protocols", "ProtRelionReconstruct", doRaise=True)

#: flexutils' protocols whose programs live in its conda environments: (input parameter, other parameters, the
#: file in extra/ the protocol writes from our zFlex for its program, the activation, the program).
TOOLKIT = {
    "dimensionality reduction": (flexutils.ProtFlexDimRedSpace, "particles", dict(mode=1, dimensions=3, useGpu=False),
                                 "z_space.txt", "conda activate flexutils", "dimensionality_reduction.py"),
    "optimal clusters": (flexutils.ProtFlexOptimalClusters, "inputParticles", dict(maxClusters=4),
                         "flex_space.txt", "conda activate flexutils-tensorflow", "find_optimal_clusters.py"),
    "score landscape": (flexutils.ProtFlexScoreLandscape, "inputParticles", dict(neighbours=5),
                        "landscape.txt", "conda activate flexutils", "compute_landscape_zscores.py"),
}


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


def _log(prot) -> str:
    return " ".join(Path(f).read_text() for f in prot.getLogPaths() if os.path.exists(f))


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


def test_cryodrgn_subset_of_our_particles_feeds_flexutils_relion_and_cryohet(project, flex_run, tmp_path):
    """cryoDRGN's subset protocol on our particles, with indices as cryoDRGN's filtering notebook saves them; the
    subset keeps our latents and FlexInfo, and flexutils, RELION and cryohet's latent viewer take it."""
    prot, flex, z = flex_run
    keep = np.flatnonzero(z[:, 0] > np.median(z[:, 0]))
    index_file = tmp_path / "ind_selected.pkl"
    with open(index_file, "wb") as fh:
        pickle.dump(keep, fh)
    sub = launch(project, project.newProtocol(cryodrgn.CryoDrgnProtSubset, inputParticles=flex,
                                              pklFile=str(index_file)))
    out = sub.Particles
    assert isinstance(out, SetOfParticlesFlex) and out.getSize() == len(keep)
    np.testing.assert_allclose(_z(out), z[keep], rtol=1e-5, atol=1e-6)
    assert all(p.getCTF() is not None and p.getTransform() is not None for p in out.iterItems())
    # the set is created as cryoDRGN's, then copyInfo brings our FlexInfo back: it still names cryohet's latents
    info = out.getFlexInfo()
    assert info.getProgName() == "CryoHet" and info.getAttr("latentsFile") == flex.getFlexInfo().getAttr("latentsFile")

    pca = launch(project, project.newProtocol(flexutils.ProtFlexFilterPCA, particles=out, keepPCA="1"))
    assert pca.outputParticles.getSize() == len(keep)
    rec = launch(project, project.newProtocol(ProtRelionReconstruct, inputParticles=out, numberOfMpi=1, doCTF=True))
    assert os.path.getsize(rec.outputVolume.getFileName().split(":")[0]) > 32 ** 3 * 4
    pngs = CryohetFlexViewer(project=project).render(out, prot._getExtraPath("plots_cryodrgn_subset"))
    assert len(pngs) == 2 and all(os.path.getsize(p) > 0 for p in pngs)


@pytest.mark.parametrize("name", list(TOOLKIT))
def test_flexutils_toolkit_protocols_take_our_latents_but_need_their_conda_environment(project, flex_run, name):
    """The protocol validates our particles, writes our latents as its program's input, and stops at the
    activation of flexutils' conda environment, which this machine does not have (the shell's exit 127)."""
    _, flex, z = flex_run
    cls, input_name, params, written, activation, program = TOOLKIT[name]
    prot = project.newProtocol(cls, **{input_name: flex}, **params)
    assert prot.validate() == []
    prot = launch(project, prot, ok=False)
    assert prot.isFailed()
    np.testing.assert_allclose(np.loadtxt(prot._getExtraPath(written), ndmin=2), z, rtol=1e-5, atol=1e-6)
    error = prot.getErrorMessage()
    assert f"{activation} " in error and program in error and "exit status 127" in error, _log(prot)[-2000:]


def test_flexutils_forms_read_our_latent_space(project, flex_run):
    """Dimensionality reduction's validation reads the dimension of our zFlex; annotation's refuses particles
    without reduced coordinates (zRed), which only flexutils' dimensionality reduction (its conda program) sets."""
    _, flex, z = flex_run
    dimred = project.newProtocol(flexutils.ProtFlexDimRedSpace, particles=flex, mode=1, dimensions=z.shape[1] + 1)
    assert any(f"original dimensions = {z.shape[1]}" in e for e in dimred.validate())
    annotate = project.newProtocol(flexutils.ProtFlexAnnotateSpace, particles=flex, neighbors=10, useGpu=False)
    assert [e for e in annotate.validate() if "dimensionality reduced" in e] and len(annotate.validate()) == 1


def test_cryodrgn_training_takes_our_particles_but_needs_its_conda_environment(project, flex_run):
    """cryoDRGN's training writes our particles (poses, CTF) as its input STAR, then stops at the activation of
    cryoDRGN's own conda environment."""
    _, flex, _ = flex_run
    prot = project.newProtocol(cryodrgn.CryoDrgnProtTrain, inputParticles=flex, zDim=2, numEpochs=1)
    assert prot.validate() == []
    prot = launch(project, prot, ok=False)
    assert prot.isFailed()
    star = Table(fileName=prot._getExtraPath("input_particles.star"), tableName="particles")
    assert len(star) == N_PARTICLES and {"rlnAngleRot", "rlnDefocusU"} <= set(star.getColumnNames())
    error = prot.getErrorMessage()
    assert "conda activate cryodrgn-" in error and "parse_pose_star" in error and "exit status 127" in error


def test_scipion_viewers_of_flexutils_and_cryohet_open_our_outputs(project, flex_run):
    """Scipion's *Open with* lists for our particles the table viewer (in the metadata mode flexutils registers
    for SetOfParticlesFlex) and cryohet's latent view, and for the classes of cryohet's analyze flexutils' class
    viewer, whose view holds our classes and their representative maps."""
    prot, flex, z = flex_run
    viewers = Domain.findViewers(flex, DESKTOP_TKINTER)
    assert CryohetFlexViewer in viewers and any(issubclass(v, DataViewer) for v in viewers), viewers
    view = DataViewer(project=project)._visualize(flex)[0]
    assert view._path == flex.getFileName() and view._viewParams.get("mode") == "metadata"
    assert len(CryohetFlexViewer(project=project).render(flex, prot._getExtraPath("plots_flex"))) == 2

    an = project.newProtocol(CryohetProtAnalyze, ksample=3, pcs=0, umap=False, useGpu=False)
    getattr(an, CryohetProtAnalyze._paramAttrs["run"]).set(prot)
    classes = launch(project, an).outputClasses
    assert FlexDataViewer in Domain.findViewers(classes, DESKTOP_TKINTER)
    view = FlexDataViewer(project=project)._visualize(classes)[0]
    assert type(view).__name__ == "Classes3DView" and view._path == classes.getFileName()
    assert view._viewParams["render"] == "_representative._filename"
    assert sum(c.getSize() for c in classes.iterItems()) == N_PARTICLES
    assert all(os.path.isfile(c.getRepresentative().getFileName()) for c in classes.iterItems())
