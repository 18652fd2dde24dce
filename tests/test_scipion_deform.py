"""Deformation models through Scipion: a consensus map from cryohet's reconstruct feeds train-deform; its latents come
back as a SetOfParticlesFlex, its refined canonical map and maps along the motion as volumes, its moved points as
an AtomStruct; reconstruct-deformed then takes that protocol as its run and gives the corrected map with its
half-maps beside the homogeneous one."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from scipion_tools import launch, new_project, simulate


@pytest.fixture(scope="module")
def project():
    with new_project("deform") as proj:
        yield proj


@pytest.fixture(scope="module")
def particles_and_map(project):
    from cryohet_plugin.protocols import CryohetProtReconstruct

    parts = simulate(project, 300).outputParticles
    rec = launch(project, project.newProtocol(CryohetProtReconstruct, particles=parts, useGpu=False,
                                              numberOfThreads=1))
    return parts, rec.outputVolume


def test_train_deform_then_reconstruct_deformed(project, particles_and_map):
    from cryohet_plugin.protocols import CryohetProtReconstructDeformed, CryohetProtTrainDeform

    parts, consensus = particles_and_map
    deform = launch(project, project.newProtocol(CryohetProtTrainDeform, particles=parts, consensus_map=consensus,
                                                 zdim=2, epochs=2, n_maps=3, n_clusters=0, useGpu=False,
                                                 numberOfThreads=1))
    engine = Path(deform._getExtraPath("cryohet"))
    z = np.load(engine / "z.npy")
    flex = {p.getObjId(): np.asarray(p.getZFlex(), np.float64) for p in deform.outputParticlesFlex}
    assert set(flex) == {p.getObjId() for p in parts} and len(z) == len(flex)
    assert sorted(v[0] for v in flex.values()) == pytest.approx(sorted(z[:, 0]), rel=1e-5, abs=1e-6)
    assert Path(deform.outputVolume.getFileName()).name == "canonical_map.mrc"
    assert deform.outputVolume.getSamplingRate() == pytest.approx(parts.getSamplingRate())
    assert deform.outputVolumeSeries.getSize() == 3
    assert Path(deform.outputAtomStruct.getFileName()).name == "pc1_points.pdb"

    rd = project.newProtocol(CryohetProtReconstructDeformed, useGpu=False, numberOfThreads=1)
    getattr(rd, CryohetProtReconstructDeformed._paramAttrs["run"]).set(deform)
    rd = launch(project, rd)
    vols = {Path(v.getFileName()).name: (v.getFileName(), sorted(Path(h).name for h in v.getHalfMaps().split(",")))
            for v in rd.outputVolumes}  # (a set's iterator fills one object: keep what is needed)
    assert vols["map.mrc"][1] == ["half1.mrc", "half2.mrc"]
    assert vols["homogeneous.mrc"][1] == ["homogeneous_half1.mrc", "homogeneous_half2.mrc"]
    for path, _ in vols.values():
        with mrcfile.open(path, permissive=True) as m:
            assert m.data.shape == (32, 32, 32) and np.isfinite(m.data).all() and m.data.std() > 0


def test_train_gmm_gives_flex_particles_models_and_a_run_for_reconstruct_deformed(project, particles_and_map):
    """train-gmm with its half-set models: the latents as a SetOfParticlesFlex, the pseudo-atom models along the
    principal components as AtomStructs; reconstruct-deformed then takes the protocol as its run."""
    from cryohet_plugin.protocols import CryohetProtReconstructDeformed, CryohetProtTrainGmm

    parts, consensus = particles_and_map
    gmm = launch(project, project.newProtocol(CryohetProtTrainGmm, particles=parts, consensus_map=consensus,
                                              zdim=2, epochs=2, warmup_epochs=1, n_maps=3, n_clusters=0,
                                              useGpu=False, numberOfThreads=1))
    engine = Path(gmm._getExtraPath("cryohet"))
    z = np.load(engine / "z.npy")
    flex = {p.getObjId(): np.asarray(p.getZFlex(), np.float64) for p in gmm.outputParticlesFlex}
    assert len(flex) == parts.getSize() == len(z)
    assert sorted(v[1] for v in flex.values()) == pytest.approx(sorted(z[:, 1]), rel=1e-5, abs=1e-6)
    error = np.load(engine / "deformation_error.npy")
    assert error.shape == (len(z),) and np.isfinite(error).all() and (error >= 0).all()
    models = sorted(Path(s.getFileName()).name for s in gmm.outputAtomStructs)
    assert "gaussian_error.pdb" in models and len(models) >= 3
    assert gmm.outputVolumeSeries.getSize() == 3

    rd = project.newProtocol(CryohetProtReconstructDeformed, useGpu=False, numberOfThreads=1)
    getattr(rd, CryohetProtReconstructDeformed._paramAttrs["run"]).set(gmm)
    rd = launch(project, rd)
    names = sorted(Path(v.getFileName()).name for v in rd.outputVolumes)
    assert names == ["homogeneous.mrc", "map.mrc"]
    # each half-map was made with its own half-set model, on the half-sets the models were trained on
    from cryohet.record import read_record

    corrected = read_record(Path(rd._getExtraPath("cryohet"))).of_kind("volume")[0]
    assert corrected.path == "map.mrc" and corrected.meta["half_set_models"] is True
    subset = starfile.read(engine / "particles.star")["particles"]["rlnRandomSubset"].to_numpy()
    assert sorted(set(subset)) == [1, 2] and abs(int((subset == 1).sum()) - len(subset) / 2) <= 1
