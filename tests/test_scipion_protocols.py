"""cryohet protocols in a real, headless Scipion project (pyworkflow + pwem + scipion-em-relion + RELION 3.1).

One project for the module: the simulate protocol makes the data; particles are imported from its
STAR as a user would (ProtImportParticles from RELION); the reconstruct protocol runs on them; host
protocols (RELION reconstruct and post-process through scipion-em-relion) consume the outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from pwem.objects import SetOfParticles, SetOfVolumes, Volume
from pwem.protocols import ProtImportMask, ProtImportParticles
from pyworkflow.plugin import Domain
from scipion_tools import launch as _launch
from scipion_tools import new_project

from cryohet_plugin.protocols import CryohetProtReconstruct, CryohetProtSimulate, ProtCryohetBase

BOX, APIX, N_PARTICLES = 32, 3.0, 300


@pytest.fixture(scope="module")
def project():
    with new_project("protocols") as proj:
        yield proj


@pytest.fixture(scope="module")
def simulated(project):
    prot = project.newProtocol(CryohetProtSimulate, n_particles=N_PARTICLES, box=BOX, apix=APIX, n_states=3,
                               resolution_A=8.0, snr=1.0, useGpu=False, numberOfThreads=2)
    prot.setObjLabel("simulate")
    return _launch(project, prot)


@pytest.fixture(scope="module")
def imported(project, simulated, tmp_path_factory):
    """The simulated particles copied elsewhere and imported from their STAR by Scipion's importer."""
    src = Path(simulated._getExtraPath("cryohet"))
    data = tmp_path_factory.mktemp("relion_data")
    shutil.copy(src / "particles.star", data)
    shutil.copy(src / "particles.mrcs", data)
    prot = project.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                               starFile=str(data / "particles.star"), samplingRate=APIX, voltage=300,
                               sphericalAberration=2.7, amplitudeContrast=0.1, magnification=10000)
    return _launch(project, prot)


@pytest.fixture(scope="module")
def mask(project, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "sphere.mrc"
    r = np.linalg.norm(np.mgrid[:BOX, :BOX, :BOX] - BOX // 2, axis=0)
    soft = np.clip((13.0 - r) / 3.0, 0, 1).astype(np.float32)
    with mrcfile.new(path) as m:
        m.set_data(soft)
        m.voxel_size = APIX
    return _launch(project, project.newProtocol(ProtImportMask, maskPath=str(path), samplingRate=APIX))


def test_generated_protocol_forms():
    """Each method's form comes from its description: types, enums, expert levels, pointers."""
    prot = CryohetProtReconstruct()
    params = dict(prot.getDefinition().iterParams())
    assert type(params["particles"]).__name__ == "PointerParam"
    assert params["particles"].pointerClass.get() == "SetOfParticles"
    assert params["mask"].pointerClass.get() == "VolumeMask" and params["mask"].allowsNull
    assert type(params["box"]).__name__ == "IntParam"
    assert params["batch_size"].expertLevel.get() == 1 and params["box"].expertLevel.get() == 0
    assert "device" not in params and "threads" not in params and "overwrite" not in params and "gpuList" in params
    sim = dict(CryohetProtSimulate().getDefinition().iterParams())
    assert type(sim["motion"]).__name__ == "EnumParam"
    assert sim["motion"].choices[int(sim["motion"].default.get())] == "hinge"
    assert type(sim["apix"]).__name__ == "FloatParam" and sim["apix"].label.get() == "Pixel size (Å/px)"
    assert type(sim["discrete"]).__name__ == "BooleanParam"
    assert ProtCryohetBase.isBase() and not CryohetProtSimulate.isBase()
    assert {"CryohetProtReconstruct", "CryohetProtSimulate"} <= set(Domain.getProtocols())


def test_every_method_has_a_protocol_with_its_parameters():
    """Adding a method to the engine adds a protocol; descriptions from the cache equal the engine's."""
    import cryohet_plugin.protocols as protocols
    from cryohet.methods import all_methods
    from cryohet_plugin import Plugin
    from cryohet_plugin.constants import HOST_FILLED
    from cryohet_plugin.descriptions import load_descriptions

    engine = all_methods()
    cached = load_descriptions(Plugin)
    assert set(cached) == set(engine)
    for name, m in engine.items():
        c = cached[name]
        assert (c.params, c.outputs, c.title, c.citations) == (m.params, m.outputs, m.title, m.citations), name
        cls = getattr(protocols, protocols.class_name(name))
        form = dict(cls().getDefinition().iterParams())
        for p in m.all_params():
            if p.name not in HOST_FILLED:
                assert cls._paramAttrs[p.name] in form, (name, p.name)


def test_simulate_protocol_outputs_and_relion_reconstruct(project, simulated):
    parts = simulated.outputParticles
    assert isinstance(parts, SetOfParticles) and parts.getSize() == N_PARTICLES
    assert parts.hasAlignmentProj() and parts.hasCTF()
    assert parts.getSamplingRate() == pytest.approx(APIX)
    first = parts.getFirstItem()
    assert first.getCTF().getDefocusU() > 5000 and os.path.exists(first.getFileName())
    assert simulated.outputVolume.getSamplingRate() == pytest.approx(APIX)
    series = simulated.outputVolumeSeries
    assert isinstance(series, SetOfVolumes) and series.getSize() == 3
    assert all(v.getSamplingRate() == pytest.approx(APIX) for v in series)

    # A host protocol consumes the simulated particles: RELION's reconstruction through scipion-em-relion.
    ProtRelionReconstruct = Domain.importFromPlugin("relion.protocols", "ProtRelionReconstruct", doRaise=True)
    rec = _launch(project, project.newProtocol(ProtRelionReconstruct, inputParticles=parts, numberOfMpi=1,
                                               doCTF=True))
    with mrcfile.open(rec.outputVolume.getFileName().split(":")[0]) as m:
        assert m.data.shape == (BOX, BOX, BOX) and float(np.abs(m.data).max()) > 0


def test_engine_runs_in_its_own_environment(project, imported, monkeypatch):
    """CRYOHET_PYTHON names the interpreter of a second environment (the README's .venv-current: the newest numpy
    and torch, no Scipion): the protocol runs the engine there, and registers its map from there, while Scipion
    keeps its own pins (numpy 1.26 here)."""
    current = Path(__file__).resolve().parents[1] / ".venv-current" / "bin" / "python"
    assert current.is_file(), f"{current}: missing (make setup-current builds the second environment)"
    monkeypatch.setenv("CRYOHET_PYTHON", str(current))  # read by the plugin in the protocol's own process
    rec = _launch(project, project.newProtocol(CryohetProtReconstruct, particles=imported.outputParticles,
                                               useGpu=False, numberOfThreads=2))
    record = json.loads(Path(rec._getExtraPath("cryohet", "cryohet_run.json")).read_text())
    assert record["versions"]["numpy"].startswith("2.") and np.__version__.startswith("1.26")
    assert rec.outputVolume.getSamplingRate() == pytest.approx(APIX)


def test_reconstruct_protocol_then_relion_postprocess(project, imported, mask):
    parts = imported.outputParticles
    assert parts.hasAlignmentProj() and parts.hasCTF()
    prot = project.newProtocol(CryohetProtReconstruct, particles=parts, mask=mask.outputMask, useGpu=False,
                               numberOfThreads=2)
    prot = _launch(project, prot)
    vol = prot.outputVolume
    assert isinstance(vol, Volume) and vol.getSamplingRate() == pytest.approx(APIX)
    halves = vol.getHalfMaps().split(",")
    assert len(halves) == 2 and all(os.path.exists(h) for h in halves)
    fscs = {f.getObjLabel().split(": ")[-1]: float(f.calculateResolution()) for f in prot.outputFSC}
    assert set(fscs) == {"unmasked", "masked"} and all(2 * APIX <= r < 60 for r in fscs.values()), fscs
    # the engine read what the converter wrote: one row per particle, Scipion ids kept
    star = Path(prot._getExtraPath("input", "input_particles.star")).read_text()
    assert "_cryohetScipionId" in star and "_rlnAngleRot" in star and "_rlnDefocusU" in star
    assert "Error" not in " ".join(prot.summary())

    # A host protocol consumes the volume and its half-maps: RELION post-processing.
    ProtRelionPostprocess = Domain.importFromPlugin("relion.protocols", "ProtRelionPostprocess", doRaise=True)
    post = _launch(project, project.newProtocol(ProtRelionPostprocess, relionInput=False, inputType=0,
                                                inputVolume=vol, solventMask=mask.outputMask))
    assert os.path.exists(post.outputVolume.getFileName())
    assert "Final resolution" in " ".join(post.summary())

    # The viewers render headless (PNG, ChimeraX script).
    from cryohet_plugin.viewers import CryohetResultsViewer

    files = CryohetResultsViewer(project=project, protocol=prot).render(prot)
    assert any(f.endswith("fsc_1.png") for f in files["png"]) and files["cxc"]
    assert all(os.path.getsize(f) > 1000 for f in files["png"])


def test_protocol_reloads_by_class_name_in_a_new_process(project, simulated):
    """What the protocol runner does: a fresh python loads the project and finds the generated class."""
    code = ("import sys; from pyworkflow.project import Manager; "
            "p = Manager().loadProject(sys.argv[1]).getProtocol(int(sys.argv[2])); "
            "print(type(p).__name__, p.n_particles.get(), p.getStatus())")
    out = subprocess.run([sys.executable, "-c", code, project.getName(), str(simulated.getObjId())],
                         capture_output=True, text=True, check=True, cwd=project.path).stdout.split()[-3:]
    assert out == ["CryohetProtSimulate", str(N_PARTICLES), "finished"]


def test_validate_rejects_particles_without_ctf(project, simulated, tmp_path):
    star = Path(simulated._getExtraPath("cryohet", "particles.star")).read_text()
    shutil.copy(simulated._getExtraPath("cryohet", "particles.mrcs"), tmp_path)
    lines = star.splitlines()
    ctf_cols = [i for i, line in enumerate(lines) if line.startswith("_rlnDefocus")]
    assert ctf_cols
    # drop the defocus columns (header and values) of the particles table
    header_end = max(i for i, line in enumerate(lines) if line.startswith("_"))
    first_col = min(i for i, line in enumerate(lines) if line.startswith("_rlnImageName"))
    drop = {i - first_col for i in ctf_cols}
    out = []
    for i, line in enumerate(lines):
        if i in ctf_cols:
            continue
        if i > header_end and line.strip():
            line = " ".join(v for j, v in enumerate(line.split()) if j not in drop)
        out.append(line)
    (tmp_path / "particles.star").write_text("\n".join(out) + "\n")
    imp = _launch(project, project.newProtocol(
        ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(tmp_path / "particles.star"), samplingRate=APIX, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1, magnification=10000))
    assert not imp.outputParticles.hasCTF()
    prot = project.newProtocol(CryohetProtReconstruct, particles=imp.outputParticles)
    errors = prot.validate()
    assert any("no CTF" in e for e in errors), errors


def test_reconstruct_fails_clearly_on_a_missing_stack(project, simulated, tmp_path):
    src = Path(simulated._getExtraPath("cryohet"))
    shutil.copy(src / "particles.star", tmp_path)
    shutil.copy(src / "particles.mrcs", tmp_path)
    imp = _launch(project, project.newProtocol(
        ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
        starFile=str(tmp_path / "particles.star"), samplingRate=APIX, voltage=300, sphericalAberration=2.7,
        amplitudeContrast=0.1, magnification=10000))
    (tmp_path / "particles.mrcs").unlink()  # the stack disappears after the import
    prot = project.newProtocol(CryohetProtReconstruct, particles=imp.outputParticles, useGpu=False)
    assert prot.validate() == []
    prot = _launch(project, prot, ok=False)
    assert prot.isFailed()
    msg = prot.getErrorMessage()
    assert "cryohet reconstruct failed" in msg and "particles.mrcs" in msg, msg
    assert not prot.hasAttribute("outputVolume")


def test_principal_volumes_select_then_relion(project, imported):
    """principal-volumes -> latents as SetOfParticlesFlex (by Scipion id) -> select a region of latent space
    -> the subset as Scipion particles -> RELION's reconstruction of that subset; analyze -> k-means clusters
    as SetOfClassesFlex."""
    from cryohet_plugin.protocols import CryohetProtPrincipalVolumes, CryohetProtSelect
    from cryohet_plugin.viewers import CryohetFlexViewer, CryohetResultsViewer

    parts = imported.outputParticles
    pv = _launch(project, project.newProtocol(CryohetProtPrincipalVolumes, particles=parts, n_components=2,
                                              resolution_A=12.0, max_iter=2, movie_frames=3, useGpu=False,
                                              numberOfThreads=2))
    z = np.load(pv._getExtraPath("cryohet", "latents.npy"))
    flex = pv.outputParticlesFlex
    assert flex.getSize() == parts.getSize() == len(z)
    assert flex.getFlexInfo().getProgName() == "CryoHet" and flex.getFlexInfo().getAttr("zDim") == 2
    ids = [p.getObjId() for p in parts.iterItems()]
    # row i of the latents belongs to the i-th particle written, i.e. the one with the i-th Scipion id
    for row in (0, len(ids) // 2, len(ids) - 1):
        item = flex[ids[row]]
        assert np.allclose(item.getZFlex(), z[row], atol=1e-5)
        assert item.getFileName() == parts[ids[row]].getFileName() and item.hasCTF()
    assert pv.outputVolumes.getSize() == 3  # mean + 2 principal volumes
    files = CryohetResultsViewer(project=project, protocol=pv).render(pv)
    assert any("latent" in f for f in files["png"]) and files["cxc"]
    assert len(CryohetFlexViewer(project=project).render(flex, pv._getExtraPath("plots_flex"))) == 2

    sel = project.newProtocol(CryohetProtSelect, region="z1:0:", useGpu=False)
    getattr(sel, CryohetProtSelect._paramAttrs["run"]).set(pv)
    sel = _launch(project, sel)
    subsets = [getattr(sel, name) for name, _ in sel.iterOutputAttributes()]
    expected = {ids[i] for i in np.nonzero(z[:, 0] >= 0)[0]}
    chosen = [s for s in subsets if {p.getObjId() for p in s.iterItems()} == expected]
    assert chosen, [(type(s).__name__, s.getSize()) for s in subsets]
    subset = chosen[0]
    assert 0 < subset.getSize() < parts.getSize() and subset.hasAlignmentProj() and subset.hasCTF()

    # Scipion's own set tools take the flexible particles: the subset of the SetOfParticlesFlex keeps zFlex
    from pwem.protocols import ProtSubSet

    sub = project.newProtocol(ProtSubSet, inputFullSet=flex, inputSubSet=subset)
    sub = _launch(project, sub)
    sub_flex = next(getattr(sub, name) for name, _ in sub.iterOutputAttributes())
    assert type(sub_flex).__name__ == "SetOfParticlesFlex" and sub_flex.getSize() == subset.getSize()
    for item in sub_flex.iterItems():
        assert np.allclose(item.getZFlex(), z[ids.index(item.getObjId())], atol=1e-5)

    ProtRelionReconstruct = Domain.importFromPlugin("relion.protocols", "ProtRelionReconstruct", doRaise=True)
    rec = _launch(project, project.newProtocol(ProtRelionReconstruct, inputParticles=subset, numberOfMpi=1,
                                               doCTF=True))
    with mrcfile.open(rec.outputVolume.getFileName().split(":")[0]) as m:
        assert m.data.shape == (BOX, BOX, BOX) and float(np.abs(m.data).max()) > 0

    # analyze -> its k-means clusters as SetOfClassesFlex (zFlex from principal-volumes, maps at the centres as
    # representatives), read back from the project database
    from cryohet_plugin.protocols import CryohetProtAnalyze

    an = project.newProtocol(CryohetProtAnalyze, ksample=3, pcs=0, umap=False, useGpu=False)
    getattr(an, CryohetProtAnalyze._paramAttrs["run"]).set(pv)
    an = _launch(project, an)
    labels = np.load(an._getExtraPath("cryohet", "kmeans3", "labels.npy"))
    classes = an.outputClasses
    assert type(classes).__name__ == "SetOfClassesFlex" and classes.getSize() == 3
    for cls in classes.iterItems():
        members = [p.getObjId() for p in cls.iterItems()]
        assert sorted(members) == sorted(ids[i] for i in np.flatnonzero(labels == cls.getObjId() - 1))
        first = cls.getFirstItem()
        assert np.allclose(first.getZFlex(), z[ids.index(first.getObjId())], atol=1e-5)
        rep = cls.getRepresentative()
        assert rep.getFileName().endswith(f"kmeans3/vol_{cls.getObjId() - 1:03d}.mrc")
        assert rep.getSamplingRate() == pytest.approx(parts.getSamplingRate(), rel=1e-3)

    # kernel-volumes on principal-volumes' latents -> maps at two latent points as a SetOfVolumes, FSCs
    from cryohet_plugin.protocols import CryohetProtKernelVolumes

    kv = project.newProtocol(CryohetProtKernelVolumes, z="-1,0;1,0", min_particles=50, n_levels=3, useGpu=False,
                             numberOfThreads=2)
    getattr(kv, CryohetProtKernelVolumes._paramAttrs["run"]).set(pv)
    kv = _launch(project, kv)
    maps = sorted(v.getFileName() for v in kv.outputVolumeSeries.iterItems())
    assert [os.path.basename(m) for m in maps] == ["kernel_000.mrc", "kernel_001.mrc"]
    assert kv.outputVolumeSeries.getSamplingRate() == pytest.approx(parts.getSamplingRate(), rel=1e-3)
    assert kv.outputFSC.getSize() == 2
    assert kv._inputParticles().getObjId() == parts.getObjId()

    # landscape of the same latents -> the particles near each point of the path as Scipion subsets
    from cryohet_plugin.protocols import CryohetProtLandscape

    ls = project.newProtocol(CryohetProtLandscape, dims=1, bootstrap=2, path_points=3, path_maps=False,
                             useGpu=False, numberOfThreads=2)
    getattr(ls, CryohetProtLandscape._paramAttrs["run"]).set(pv)
    ls = _launch(project, ls)
    record = json.loads(Path(ls._getExtraPath("cryohet", "cryohet_run.json")).read_text())
    stars = [o for o in record["outputs"] if o["kind"] == "particles_star" and "index" in o["meta"]]
    subsets = [getattr(ls, name) for name, _ in ls.iterOutputAttributes() if name.startswith("outputParticles")]
    assert stars and sorted(s.getSize() for s in subsets) == sorted(o["meta"]["n"] for o in stars)
    assert all(s.hasAlignmentProj() and s.hasCTF() for s in subsets)


def test_manifold_images_protocol_outputs_flex_particles_and_maps(project, simulated, imported):
    """manifold-images -> its coordinate as a SetOfParticlesFlex (zFlex by Scipion id), the kernel maps and the
    spectral volumes along it as two SetOfVolumes; the coordinate orders the three simulated states (|Spearman|
    0.86 measured)."""
    from scipy.stats import spearmanr

    from cryohet_plugin.protocols import CryohetProtManifoldImages

    parts = imported.outputParticles
    mi = _launch(project, project.newProtocol(CryohetProtManifoldImages, particles=parts, per_direction=60,
                                              min_per_direction=30, refine_rounds=1, n_frames=2, min_particles=50,
                                              spectral_functions=1, bootstrap=2, useGpu=False,
                                              numberOfThreads=2))
    z = np.load(mi._getExtraPath("cryohet", "latents.npy"))
    flex = mi.outputParticlesFlex
    assert flex.getSize() == parts.getSize() == len(z) and flex.getFlexInfo().getAttr("zDim") == 1
    ids = [p.getObjId() for p in parts.iterItems()]
    for row in (0, len(ids) - 1):
        assert np.allclose(flex[ids[row]].getZFlex(), z[row], atol=1e-5)
    assert mi.outputVolumeSeries.getSize() == 2 and mi.outputVolumeSeriesSpectral.getSize() == 2
    assert all("spectral_" in v.getFileName() for v in mi.outputVolumeSeriesSpectral.iterItems())
    truth = starfile.read(simulated._getExtraPath("cryohet", "particles.star"))["particles"]  # imported in order
    assert abs(spearmanr(z[:, 0], truth["cryohetTrueState"]).correlation) > 0.6


def test_manifold_volumes_protocol_outputs_states_as_classes3d(project, simulated, imported):
    """manifold-volumes (bootstrap classifications) -> its states as a SetOfClasses3D of the imported particles
    (state maps with half-maps as representatives, members as rlnClassNumber) and each particle's embedding
    coordinate as a SetOfParticlesFlex; the states follow the three simulated ones (adjusted Rand 0.70 measured)."""
    from sklearn.metrics import adjusted_rand_score

    from cryohet_plugin.protocols import CryohetProtManifoldVolumes

    parts = imported.outputParticles
    mv = _launch(project, project.newProtocol(CryohetProtManifoldVolumes, particles=parts, n_bootstrap=4,
                                              classes=3, iterations=5, n_states=3, resolution_A=20.0, box=16,
                                              useGpu=False, numberOfThreads=2))
    table = starfile.read(mv._getExtraPath("cryohet", "particles.star"))["particles"]
    numbers = table["rlnClassNumber"].to_numpy()
    assert numbers.min() >= 1
    classes = mv.outputClasses
    assert type(classes).__name__ == "SetOfClasses3D" and classes.getSize() == len(set(numbers))
    ids = [p.getObjId() for p in parts.iterItems()]
    for cls in classes.iterItems():
        assert sorted(p.getObjId() for p in cls.iterItems()) == sorted(ids[i] for i in np.flatnonzero(
            numbers == cls.getObjId()))
        rep = cls.getRepresentative()
        assert rep.getFileName().endswith(f"state_{cls.getObjId() - 1:03d}.mrc")
        assert len(rep.getHalfMaps().split(",")) == 2
    flex = mv.outputParticlesFlex
    assert flex.getSize() == parts.getSize() and flex.getFlexInfo().getAttr("zDim") == 2
    truth = starfile.read(simulated._getExtraPath("cryohet", "particles.star"))["particles"]  # imported in order
    assert adjusted_rand_score(truth["cryohetTrueState"], numbers) > 0.4


def test_classify_protocol_outputs_classes3d_that_relion_reconstructs(project, imported):
    """classify -> SetOfClasses3D of the imported particles (class maps with half-maps as representatives, read
    back from the project database) -> one class's particles to RELION's reconstruction through scipion-em-relion."""
    from cryohet_plugin.protocols import CryohetProtClassify

    parts = imported.outputParticles
    cl = _launch(project, project.newProtocol(CryohetProtClassify, particles=parts, K=2, iterations=3,
                                              useGpu=False, numberOfThreads=2))
    classes = cl.outputClasses
    assert type(classes).__name__ == "SetOfClasses3D"
    table = starfile.read(cl._getExtraPath("cryohet", "particles.star"))["particles"]
    ids = [p.getObjId() for p in parts.iterItems()]
    numbers = table["rlnClassNumber"].to_numpy()
    assert classes.getSize() == len(set(numbers))
    for cls in classes.iterItems():
        members = sorted(p.getObjId() for p in cls.iterItems())
        assert members == sorted(ids[i] for i in np.flatnonzero(numbers == cls.getObjId()))
        rep = cls.getRepresentative()
        assert rep.getFileName().endswith(f"class{cls.getObjId():03d}.mrc")
        assert len(rep.getHalfMaps().split(",")) == 2
        assert rep.getSamplingRate() == pytest.approx(parts.getSamplingRate(), rel=1e-3)
        first = cls.getFirstItem()
        assert first.hasCTF() and first.hasTransform()
    assert not any(name.startswith("outputParticlesClass") for name, _ in cl.iterOutputAttributes())

    # Scipion's classes extractor takes them: the biggest class's particles -> RELION's reconstruction
    from pwem.protocols.protocol_classes_selector import ProtClassesSelector

    biggest = max(classes.iterItems(), key=lambda c: c.getSize())
    big_ids = {p.getObjId() for p in biggest.iterItems()}
    pick = _launch(project, project.newProtocol(ProtClassesSelector, inputClasses=classes, firstNElements=1))
    chosen = pick.output
    assert {p.getObjId() for p in chosen.iterItems()} == big_ids and chosen.hasAlignmentProj()
    ProtRelionReconstruct = Domain.importFromPlugin("relion.protocols", "ProtRelionReconstruct", doRaise=True)
    rec = _launch(project, project.newProtocol(ProtRelionReconstruct, inputParticles=chosen, numberOfMpi=1,
                                               doCTF=True))
    with mrcfile.open(rec.outputVolume.getFileName().split(":")[0]) as m:
        theirs = m.data.copy()
    with mrcfile.open(cl._getExtraPath("cryohet", f"class{biggest.getObjId():03d}.mrc")) as m:
        ours = m.data.copy()
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.5


def test_multibody_then_flex_analyse_protocols(project, tmp_path_factory):
    """multibody on imported particles and an imported consensus map (bodies as mask files) -> body maps with
    half-maps, body masks and the body motions as SetOfParticlesFlex; flex-analyse on that run -> maps along the
    first component and the particles in a range of it as a Scipion subset."""
    from pwem.protocols import ProtImportVolumes

    from cryohet.simulate.bodies import simulate_two_bodies
    from cryohet_plugin.protocols import CryohetProtFlexAnalyse, CryohetProtMultibody

    data = simulate_two_bodies(tmp_path_factory.mktemp("two_body"), n_particles=120, box=BOX, apix=APIX, snr=5.0)
    parts = _launch(project, project.newProtocol(
        ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION, starFile=str(data.particles_star),
        samplingRate=APIX, voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1,
        magnification=10000)).outputParticles
    vol = _launch(project, project.newProtocol(ProtImportVolumes, filesPath=str(data.mean_map),
                                               samplingRate=APIX)).outputVolume
    mb = project.newProtocol(CryohetProtMultibody, bodies=",".join(map(str, data.mask_paths)), iterations=1,
                             resolution_A=9.0, useGpu=False, numberOfThreads=2)
    attrs = CryohetProtMultibody._paramAttrs
    getattr(mb, attrs["particles"]).set(parts)
    getattr(mb, attrs["map"]).set(vol)
    mb = _launch(project, mb)
    bodies = list(mb.outputVolumes.iterItems())
    assert len(bodies) == 2 and all(len(b.getHalfMaps().split(",")) == 2 for b in bodies)
    assert mb.outputMasks.getSize() == 2
    flex = mb.outputParticlesFlex
    motions = np.load(mb._getExtraPath("cryohet", "body_motions.npy"))
    assert flex.getSize() == parts.getSize() and flex.getFlexInfo().getAttr("zDim") == 12
    first = next(iter(flex.iterItems()))
    ids = [p.getObjId() for p in parts.iterItems()]
    assert np.allclose(first.getZFlex(), motions[ids.index(first.getObjId())], atol=1e-4)

    fa = project.newProtocol(CryohetProtFlexAnalyse, relative_to=1, components=1, maps_per_component=3,
                             select_component=1, select_min=0.0, useGpu=False)
    getattr(fa, CryohetProtFlexAnalyse._paramAttrs["run"]).set(mb)
    fa = _launch(project, fa)
    assert fa.outputVolumeSeries.getSize() == 3
    z = np.load(fa._getExtraPath("cryohet", "components.npy"))
    subsets = [getattr(fa, n) for n, _ in fa.iterOutputAttributes() if n.startswith("outputParticles")
               and getattr(fa, n).getSize() < parts.getSize()]
    assert [s.getSize() for s in subsets] == [int((z[:, 0] >= 0).sum())]


def test_abinit_protocol_takes_particles_without_poses(project, simulated, tmp_path_factory):
    """Particles imported from a STAR without poses (no alignment in Scipion) -> abinit -> the same particles
    (ids, CTF) with the poses found, and the map with its half-maps; RELION's reconstruction (scipion-em-relion)
    of those particles gives our map (FSC above 0.9 to 16 Å: ours is Wiener-filtered, RELION's is not)."""
    from cryohet_plugin.protocols import CryohetProtAbinit

    src = Path(simulated._getExtraPath("cryohet"))
    data = tmp_path_factory.mktemp("no_poses")
    tables = starfile.read(src / "particles.star")
    pose_columns = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    starfile.write({"optics": tables["optics"], "particles": tables["particles"].drop(columns=pose_columns)},
                   data / "particles.star")
    shutil.copy(src / "particles.mrcs", data)
    imp = _launch(project, project.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                               starFile=str(data / "particles.star"), samplingRate=APIX, voltage=300,
                                               sphericalAberration=2.7, amplitudeContrast=0.1, magnification=10000))
    parts = imp.outputParticles
    assert not parts.hasAlignmentProj()
    ab = _launch(project, project.newProtocol(CryohetProtAbinit, particles=parts, global_iterations=4,
                                              local_iterations=1, global_subset=100, useGpu=False,
                                              numberOfThreads=2))
    posed = ab.outputParticles
    assert posed.hasAlignmentProj() and posed.getSize() == parts.getSize()
    assert [p.getObjId() for p in posed.iterItems()] == [p.getObjId() for p in parts.iterItems()]
    first = posed.getFirstItem()
    assert first.hasCTF() and first.hasTransform()
    assert first.getCTF().getDefocusU() == pytest.approx(parts.getFirstItem().getCTF().getDefocusU())
    assert len(ab.outputVolume.getHalfMaps().split(",")) == 2
    ProtRelionReconstruct = Domain.importFromPlugin("relion.protocols", "ProtRelionReconstruct", doRaise=True)
    rec = _launch(project, project.newProtocol(ProtRelionReconstruct, inputParticles=posed, numberOfMpi=1,
                                               doCTF=True))
    with mrcfile.open(rec.outputVolume.getFileName().split(":")[0]) as m:
        theirs = m.data.copy()
    with mrcfile.open(ab._getExtraPath("cryohet", "map.mrc")) as m:
        ours = m.data.copy()
    from cryohet.reconstruct.fsc import fsc

    assert fsc(ours, theirs)[1:int(BOX * APIX / 16.0) + 1].min() > 0.9  # the same map to 16 Å
