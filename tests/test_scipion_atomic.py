"""Atomic models through Scipion: an imported AtomStruct feeds ``cryohet nma``; its modes come back as Scipion's
SetOfNormalModes (one vector file per mode, as ContinuousFlex keeps them), its models as AtomStructs and its mode
maps as volumes."""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest
from scipion_tools import launch, new_project, simulate

MODEL = Path(__file__).resolve().parents[1] / "cryohet" / "data" / "default_molecule.pdb"


@pytest.fixture(scope="module")
def project():
    with new_project("atomic") as proj:
        yield proj


@pytest.fixture(scope="module")
def imported_model(project):
    from pwem.protocols import ProtImportPdb

    prot = project.newProtocol(ProtImportPdb, inputPdbData=ProtImportPdb.IMPORT_FROM_FILES, pdbFile=str(MODEL),
                               skipChimera=True)
    return launch(project, prot).outputPdb


def test_nma_protocol_takes_an_atomstruct_and_outputs_modes_models_and_maps(project, imported_model):
    from cryohet_plugin.protocols import CryohetProtNma

    prot = launch(project, project.newProtocol(CryohetProtNma, model=imported_model, n_modes=5, movie_modes=2,
                                               n_frames=3, useGpu=False, numberOfThreads=1))
    engine = Path(prot._getExtraPath("cryohet"))
    with np.load(engine / "modes.npz", allow_pickle=False) as f:
        modes, collectivity = f["modes"], f["collectivity"]
    assert modes.shape == (5, 214, 3)  # adenylate kinase: 214 Cα nodes

    out_modes = prot.outputModes
    assert out_modes.getSize() == 5
    assert Path(out_modes.getPdb().getFileName()).resolve() == Path(imported_model.getFileName()).resolve()
    for k, mode in enumerate(out_modes, start=0):
        vec = np.loadtxt(mode.getModeFile())
        np.testing.assert_allclose(vec, modes[k], atol=1e-7)
        assert mode.getCollectivity() == pytest.approx(float(collectivity[k]))

    files = {Path(s.getFileName()).name: Path(s.getFileName()) for s in prot.outputAtomStructs}
    assert sorted(files) == ["atoms.pdb", "mode_01.pdb", "mode_02.pdb"]
    movie = gemmi.read_structure(str(files["mode_01.pdb"]))
    assert len(movie) == 3  # frames as models, every heavy atom moving with its residue
    assert movie[0].count_atom_sites() == gemmi.read_structure(str(MODEL))[0].count_atom_sites()

    for series in (prot.outputVolumeSeries, prot.outputVolumeSeriesMode_02):  # the maps along each mode
        assert series.getSize() == 3
        assert all(Path(v.getFileName()).exists() for v in series)
        assert series.getSamplingRate() == pytest.approx(8.0 / 3)  # --resolution_A 8 / 3 without a map


@pytest.fixture(scope="module")
def simulated(project):
    return simulate(project, 300)


@pytest.fixture(scope="module")
def placed_model(project, tmp_path_factory):
    """The simulated molecule placed in the particles' map frame (box 32, 3 Å/px), imported as an AtomStruct."""
    from pwem.protocols import ProtImportPdb

    from cryohet.io.atomic_model import read_atoms, write_models
    from cryohet.simulate.modes import place_in_box

    atoms = place_in_box(read_atoms(MODEL, "heavy"), 32, 3.0)
    path = tmp_path_factory.mktemp("placed") / "placed.pdb"
    write_models(path, atoms, atoms.xyz_A[None])
    prot = project.newProtocol(ProtImportPdb, inputPdbData=ProtImportPdb.IMPORT_FROM_FILES, pdbFile=str(path),
                               skipChimera=True)
    return launch(project, prot).outputPdb


def _flex_rows(particles) -> dict[int, np.ndarray]:
    return {p.getObjId(): np.asarray(p.getZFlex(), dtype=np.float64) for p in particles}


def _star_z(star: Path, k: int) -> dict[int, np.ndarray]:
    import starfile

    df = starfile.read(star)["particles"]
    return {int(i): np.array([r[f"cryohetZ{j + 1}"] for j in range(k)]) for i, (_, r) in
            zip(df["cryohetScipionId"], df.iterrows())}


def test_fit_modes_and_train_atomic_protocols_give_flex_particles_and_models(project, simulated, placed_model):
    """nma on the placed model, then fit-modes on the simulated particles with those modes, and train-atomic with the
    model: each gives the particles with its latents (SetOfParticlesFlex, rows matched by Scipion id) and its atomic
    models (AtomStructs)."""
    from cryohet_plugin.protocols import CryohetProtFitModes, CryohetProtNma, CryohetProtTrainAtomic

    nma = launch(project, project.newProtocol(CryohetProtNma, model=placed_model, n_modes=3, movie_modes=0,
                                              useGpu=False, numberOfThreads=1))
    parts = simulated.outputParticles
    fit = launch(project, project.newProtocol(
        CryohetProtFitModes, particles=parts, modes=nma,
        modes_used="1-2", fit=1, epochs=2, useGpu=False, numberOfThreads=1))  # fit=1: amortised
    atomic = launch(project, project.newProtocol(CryohetProtTrainAtomic, particles=parts, model=placed_model,
                                                 zdim=2, epochs=1, n_models=3, n_clusters=0, useGpu=False,
                                                 numberOfThreads=1))
    for prot, k, models in ((fit, 2, {"mode_1.pdb", "mode_2.pdb"}), (atomic, 2, {"pc1_models.pdb"})):
        flex = prot.outputParticlesFlex
        assert flex.getSize() == parts.getSize()
        rows = _flex_rows(flex)
        star = _star_z(Path(prot._getExtraPath("cryohet", "particles.star")), k)
        assert set(rows) == set(star) == {p.getObjId() for p in parts}
        for pid in list(rows)[:20]:
            np.testing.assert_allclose(rows[pid], star[pid], rtol=1e-5, atol=1e-6)
        out = prot.outputAtomStruct if len(models) == 1 else prot.outputAtomStructs
        names = {Path(out.getFileName()).name} if len(models) == 1 else {Path(s.getFileName()).name for s in out}
        assert names == models


def test_reweight_protocol_gives_frame_coordinates_maps_and_models(project, simulated, tmp_path_factory):
    """Reweighting the simulated particles against a multi-model PDB of frames in their map frame: the expected frame
    per particle as a 1-D flexible coordinate, the most populated frames as maps and as an AtomStruct."""
    from cryohet.io.atomic_model import write_models
    from cryohet.simulate.ensemble import transition_frames
    from cryohet_plugin.protocols import CryohetProtReweight

    atoms, frames = transition_frames(4, 32, 3.0)
    traj = tmp_path_factory.mktemp("frames") / "frames.pdb"
    write_models(traj, atoms, frames)
    parts = simulated.outputParticles
    prot = launch(project, project.newProtocol(CryohetProtReweight, particles=parts, trajectory=str(traj),
                                               n_maps=2, mcmc_samples=50, burn_in=10, useGpu=False,
                                               numberOfThreads=1))
    engine = Path(prot._getExtraPath("cryohet"))
    z = np.load(engine / "latents.npy")
    flex = _flex_rows(prot.outputParticlesFlex)
    assert len(flex) == parts.getSize() == len(z)
    assert all(v.shape == (1,) and 1 <= v[0] <= 4 for v in flex.values())  # the expected frame number
    assert sorted(flex[k][0] for k in flex) == pytest.approx(sorted(z.ravel()), rel=1e-5)
    assert prot.outputVolumeSeries.getSize() == 2
    top = gemmi.read_structure(prot.outputAtomStruct.getFileName())
    assert len(top) == 2 and top[0].count_atom_sites() == len(atoms)
