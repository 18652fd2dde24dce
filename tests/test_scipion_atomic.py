"""Atomic models through Scipion: an imported AtomStruct feeds ``cryohet nma``; its modes come back as Scipion's
SetOfNormalModes (one vector file per mode, as ContinuousFlex keeps them), its models as AtomStructs and its mode
maps as volumes."""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest

from tests.scipion_tools import launch, new_project

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
