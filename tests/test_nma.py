"""``cryohet nma``: ANM modes against ProDy 2.6.1 (both solvers, Cα and heavy atoms of real proteins), the outputs
(modes.npz, movies, maps, ChimeraX scripts), pseudo-atoms of a simulated map, and every bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import prody
import pytest
import torch

from cryohet.cli import main
from cryohet.device import free_memory_bytes
from cryohet.errors import InputError
from cryohet.io.atomic_model import box_centre_A, read_atoms
from cryohet.io.mrc import write_map
from cryohet.io.normal_modes import read_normal_modes
from cryohet.models.elastic_network import (
    anm_hessian,
    anm_modes,
    max_atoms,
    network_pieces,
    plan_memory,
    subspace_overlaps,
)
from cryohet.models.pseudo_atoms import place_pseudo_atoms, pseudo_atom_count
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import DEFAULT_MOLECULE

prody.confProDy(verbosity="none")
PRODY_DATA = Path(prody.__file__).resolve().parent / "tests" / "datafiles"
UBIQUITIN = PRODY_DATA / "pdb1ubi.pdb"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the runs get with --threads 1 (two threads on a shared CPU slow eigh tenfold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prody_anm(xyz: np.ndarray, n_modes: int) -> prody.ANM:
    anm = prody.ANM("reference")
    anm.buildHessian(xyz, cutoff=15.0, gamma=1.0)
    anm.calcModes(n_modes, zeros=False)
    return anm


@pytest.mark.parametrize("solver", ["prody", "torch"])
@pytest.mark.parametrize("path, selection", [(DEFAULT_MOLECULE, "ca"), (UBIQUITIN, "ca"), (UBIQUITIN, "heavy")],
                         ids=["adk-ca", "ubq-ca", "ubq-heavy"])
def test_modes_match_prody(path: Path, selection: str, solver: str) -> None:
    nodes = read_atoms(path, selection)
    nm = anm_modes(nodes, 20, solver=solver, selection=selection)
    ref = _prody_anm(nodes.xyz_A, 20)
    assert nm.solver == solver and nm.modes.shape == (20, len(nodes), 3)
    np.testing.assert_allclose(nm.eigenvalues, ref.getEigvals(), rtol=1e-4)
    ref_modes = ref.getEigvecs().T.reshape(20, len(nodes), 3)
    assert subspace_overlaps(nm.modes, ref_modes, ref.getEigvals()).min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(nm.modes.reshape(20, -1), axis=1), 1.0, atol=1e-10)
    np.testing.assert_allclose(nm.collectivity, prody.calcCollectivity(ref), atol=1e-8)
    np.testing.assert_allclose(nm.square_fluctuations(), prody.calcSqFlucts(ref), rtol=1e-6)


def test_hessian_matches_prody() -> None:
    xyz = read_atoms(UBIQUITIN, "ca").xyz_A
    ref = prody.ANM("reference")
    ref.buildHessian(xyz, cutoff=15.0, gamma=1.0)
    ours = anm_hessian(torch.as_tensor(xyz), 15.0, 1.0, block_bytes=9 * 8 * len(xyz) * 7).numpy()  # 7-atom blocks
    np.testing.assert_allclose(ours, ref.getHessian(), atol=1e-12)


def test_network_in_two_pieces_warns_and_drops_both_rigid_sets(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    one = read_atoms(UBIQUITIN, "ca")
    two = read_atoms(UBIQUITIN, "ca")
    two.xyz_A = np.concatenate([one.xyz_A, one.xyz_A + [80.0, 0.0, 0.0]])  # a copy 80 Å away: two networks
    for f in ("weight", "chain", "resseq", "resname", "name", "element"):
        setattr(two, f, np.concatenate([getattr(one, f)] * 2))
    log = logging.getLogger("cryohet.test_nma")
    ref = _prody_anm(two.xyz_A, 10)
    for solver in ("prody", "torch"):
        with caplog.at_level(logging.WARNING, logger=log.name):
            nm = anm_modes(two, 10, solver=solver, log=log)
        assert "falls apart into 2 pieces" in caplog.text
        np.testing.assert_allclose(nm.eigenvalues, ref.getEigvals(), rtol=1e-4)
        assert nm.eigenvalues[0] > 1e-3  # the 12 rigid-body modes are gone
        # each eigenvalue of one piece appears twice (the two copies): compare the degenerate pairs' subspaces
        ref_modes = ref.getEigvecs().T.reshape(10, len(two), 3)
        assert subspace_overlaps(nm.modes, ref_modes, ref.getEigvals()).min() > 0.99


def test_zero_modes_counted_as_prody_finds_them() -> None:
    ca = read_atoms(UBIQUITIN, "ca").xyz_A
    for extra, expected in (([], (1, 6)), ([[200.0, 0, 0]], (2, 9)), ([[200.0, 0, 0], [203.0, 0, 0]], (2, 11))):
        xyz = np.concatenate([ca, np.reshape(extra, (-1, 3))])
        assert network_pieces(xyz, 15.0) == expected
        anm = prody.ANM("all")
        anm.buildHessian(xyz, cutoff=15.0, gamma=1.0)
        anm.calcModes(None, zeros=False)  # every mode: ProDy drops the zero ones itself
        assert anm.numModes() == 3 * len(xyz) - expected[1]


def test_pseudo_atoms_recover_a_simulated_map() -> None:
    box, apix, res = 48, 2.0, 8.0
    atoms = read_atoms(DEFAULT_MOLECULE, "heavy")
    atoms.xyz_A = atoms.xyz_A + box_centre_A(box, apix)
    vol = atoms_to_map(atoms.xyz_A, box, apix, res, centre_A=box_centre_A(box, apix), weights=atoms.weight)
    threshold = float(np.quantile(vol, 0.95))
    n = pseudo_atom_count(vol, apix, threshold, 5.0)
    fit = place_pseudo_atoms(vol, apix, threshold, n, "sim.mrc")
    assert fit.converged and len(fit.atoms) == n
    pseudo = atoms_to_map(fit.atoms.xyz_A, box, apix, res, centre_A=box_centre_A(box, apix), weights=fit.atoms.weight)
    assert np.corrcoef(pseudo.ravel(), vol.ravel())[0, 1] > 0.98

    def centre_and_rg(xyz: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
        c = (xyz * w[:, None]).sum(0) / w.sum()
        return c, float(np.sqrt((((xyz - c) ** 2).sum(1) * w).sum() / w.sum()))

    c0, rg0 = centre_and_rg(atoms.xyz_A, atoms.weight)
    c1, rg1 = centre_and_rg(fit.atoms.xyz_A, fit.atoms.weight)
    assert np.linalg.norm(c1 - c0) < 0.5 and abs(rg1 / rg0 - 1) < 0.02
    # its principal axes too (the shape, not only its size)
    def axes(xyz: np.ndarray, w: np.ndarray) -> np.ndarray:
        c = (xyz * w[:, None]).sum(0) / w.sum()
        return np.linalg.eigvalsh(((xyz - c).T * w) @ (xyz - c) / w.sum())
    np.testing.assert_allclose(axes(fit.atoms.xyz_A, fit.atoms.weight), axes(atoms.xyz_A, atoms.weight), rtol=0.05)


def _run(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["nma", *args, "--o", str(out), "--threads", "1", "--device", "cpu"])
    return code, capsys.readouterr().err


def test_cli_outputs_of_an_atomic_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nma"
    amp, frames = 2.5, 5
    code, err = _run(["--model", str(DEFAULT_MOLECULE), "--n_modes", "8", "--movie_modes", "2", "--amplitude_A",
                      str(amp), "--n_frames", str(frames), "--apix", "3", "--resolution_A", "9"], out, capsys)
    assert code == 0, err
    record = json.loads((out / "cryohet_run.json").read_text())
    assert record["status"] == "finished"
    kinds = [(o["kind"], o["path"]) for o in record["outputs"]]
    assert ("normal_modes", "modes.npz") in kinds and ("atomic_model", "mode_02.pdb") in kinds
    assert ("chimerax", "mode_01.cxc") in kinds and ("plot", "modes.png") in kinds
    assert record["outputs"][0]["meta"]["solver"] == "prody"  # --solver auto on the CPU
    # modes.npz: the shared format, arrays only
    with np.load(out / "modes.npz", allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    nodes = read_atoms(DEFAULT_MOLECULE, "ca")
    assert d["modes"].shape == (8, 214, 3) and d["modes"].dtype == np.float64 and d["eigenvalues"].shape == (8,)
    assert np.all(np.diff(d["eigenvalues"]) > 0) and str(d["selection"]) == "ca"
    assert float(d["cutoff_A"]) == 15.0 and float(d["gamma"]) == 1.0
    np.testing.assert_allclose(d["coords_A"], nodes.xyz_A)
    np.testing.assert_allclose(d["weight"], nodes.weight)
    assert list(d["resname"]) == list(nodes.resname) and d["chain"].dtype.kind == "U"
    ref = _prody_anm(nodes.xyz_A, 8)
    np.testing.assert_allclose(d["eigenvalues"], ref.getEigvals(), rtol=1e-4)
    np.testing.assert_allclose(d["collectivity"], prody.calcCollectivity(ref), atol=1e-8)
    assert len(read_normal_modes(out / "modes.npz").eigenvalues) == 8
    table = np.genfromtxt(out / "modes.csv", delimiter=",", names=True)
    np.testing.assert_allclose(table["eigenvalue"], d["eigenvalues"], rtol=1e-6)
    np.testing.assert_allclose(table["collectivity"], d["collectivity"], atol=1e-6)
    # the movie: every heavy atom moves with its residue's Cα along the mode; the Cα RMS displacement at the
    # ends is the amplitude; the middle frame is the model
    movie = prody.parsePDB(str(out / "mode_01.pdb"))
    heavy = read_atoms(DEFAULT_MOLECULE, "heavy")
    xyz = movie.getCoordsets()
    assert xyz.shape == (frames, len(heavy), 3)
    np.testing.assert_allclose(xyz[frames // 2], heavy.xyz_A, atol=2e-3)
    ca = heavy.name == "CA"
    for f, t in zip(xyz, np.linspace(-1, 1, frames)):
        shift = f - heavy.xyz_A
        assert np.sqrt((shift[ca] ** 2).sum(1).mean()) == pytest.approx(abs(t) * amp, abs=2e-3)
        np.testing.assert_allclose(shift[ca], t * amp * np.sqrt(214) * d["modes"][0], atol=2e-3)
        residue = {r: s for r, s in zip(heavy.resseq[ca], shift[ca])}
        np.testing.assert_allclose(shift, [residue[r] for r in heavy.resseq], atol=3e-3)
    # the maps: one per frame, laid on the atoms (the header's origin), the ends differing
    maps = sorted((out / "mode_01_maps").glob("*.mrc"))
    assert len(maps) == frames
    with mrcfile.open(maps[frames // 2]) as m:
        box, origin = m.data.shape[0], np.array([m.header.origin[a] for a in "xyz"], dtype=float)
        mid = m.data.copy()
        assert float(m.voxel_size.x) == pytest.approx(3.0)
    centre = origin + (box // 2) * 3.0
    expected = atoms_to_map(heavy.xyz_A, box, 3.0, 9.0, centre_A=centre, weights=heavy.weight)
    np.testing.assert_allclose(mid, expected, atol=1e-4 * float(expected.max()))
    assert heavy.xyz_A.min(0).min() > origin.min() and heavy.xyz_A.max() < (origin + box * 3.0).max()
    cxc = (out / "mode_01.cxc").read_text()
    assert "open mode_01.pdb coordsets true" in cxc and "mode_01_maps/frame_004.mrc" in cxc
    assert "coordset #1 1,5" in cxc and "vseries true" in cxc


def test_cli_mmcif_model_with_two_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = PRODY_DATA / "mmcif_1ake_chimerax.cif"  # adenylate kinase 1AKE, chains A and B
    out = tmp_path / "nma"
    code, err = _run(["--model", str(model), "--n_modes", "5", "--movie_modes", "1", "--n_frames", "3",
                      "--solver", "torch"], out, capsys)
    assert code == 0, err
    nodes = read_atoms(model, "ca")
    ref = _prody_anm(prody.parseMMCIF(str(model)).select("name CA and protein").getCoords(), 5)
    nm = read_normal_modes(out / "modes.npz")
    np.testing.assert_allclose(nm.eigenvalues, ref.getEigvals(), rtol=1e-4)
    assert set(nm.atoms.chain) == {"A", "B"} and len(nm.atoms) == len(nodes) == 428
    st = gemmi.read_structure(str(out / "mode_01.cif"))  # mmCIF in, mmCIF out: 3 frames of every heavy atom
    assert len(st) == 3 and st[0].count_atom_sites() == len(read_atoms(model, "heavy"))
    assert gemmi.read_structure(str(out / "atoms.cif"))[0].count_atom_sites() == 428
    assert "open mode_01.cif coordsets true" in (out / "mode_01.cxc").read_text()


def test_cli_pseudo_atoms_of_a_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box, apix = 40, 2.5
    atoms = read_atoms(DEFAULT_MOLECULE, "heavy")
    atoms.xyz_A = atoms.xyz_A + box_centre_A(box, apix)
    vol = atoms_to_map(atoms.xyz_A, box, apix, 8.0, centre_A=box_centre_A(box, apix), weights=atoms.weight)
    write_map(tmp_path / "sim.mrc", vol, apix)
    out = tmp_path / "nma"
    code, err = _run(["--map", str(tmp_path / "sim.mrc"), "--threshold", f"{np.quantile(vol, 0.95):.6g}",
                      "--n_pseudo", "150", "--n_modes", "6", "--movie_modes", "1", "--n_frames", "3",
                      "--solver", "torch"], out, capsys)
    assert code == 0, err
    nm = read_normal_modes(out / "modes.npz")
    assert nm.modes.shape == (6, 150, 3) and nm.selection == "pseudo"
    ref = _prody_anm(nm.atoms.xyz_A, 6)
    np.testing.assert_allclose(nm.eigenvalues, ref.getEigvals(), rtol=1e-4)
    pseudo = prody.parsePDB(str(out / "atoms.pdb"))
    np.testing.assert_allclose(pseudo.getCoords(), nm.atoms.xyz_A, atol=1e-3)
    with mrcfile.open(out / "mode_01_maps" / "frame_001.mrc") as m:  # the map's own box and frame
        assert m.data.shape == (box,) * 3 and float(m.header.origin.x) == 0.0
        assert np.corrcoef(m.data.ravel(), vol.ravel())[0, 1] > 0.95


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # more modes than the network has: 28 Cα give 3·28 - 6 = 78
    small = PRODY_DATA / "pdb2gb1_truncated.pdb"
    code, err = _run(["--model", str(small), "--n_modes", "79"], tmp_path / "a", capsys)
    assert code == 2 and str(small) in err and "79 modes requested" in err and "only 78 non-rigid modes" in err
    assert not (tmp_path / "a" / "modes.npz").exists()
    # missing atoms: a residue without its Cα
    lines = DEFAULT_MOLECULE.read_text().splitlines()
    gapped = tmp_path / "gapped.pdb"
    gapped.write_text("\n".join(ln for ln in lines if not (ln[12:16] == " CA " and int(ln[22:26]) == 50)))
    code, err = _run(["--model", str(gapped)], tmp_path / "b", capsys)
    assert code == 2 and str(gapped) in err and "lack their CA atom" in err
    code, err = _run(["--model", str(tmp_path / "none.cif")], tmp_path / "c", capsys)
    assert code == 2 and "none.cif: atomic model not found" in err
    # a model that does not lie in the reference map's box, and one of the other hand
    box, apix = 48, 2.5
    heavy = read_atoms(DEFAULT_MOLECULE, "heavy")
    vol = atoms_to_map(heavy.xyz_A + box_centre_A(box, apix), box, apix, 8.0, centre_A=box_centre_A(box, apix),
                       weights=heavy.weight)
    write_map(tmp_path / "ref.mrc", vol, apix)
    code, err = _run(["--model", str(DEFAULT_MOLECULE), "--reference_map", str(tmp_path / "ref.mrc")],
                     tmp_path / "d", capsys)
    assert code == 2 and str(DEFAULT_MOLECULE) in err and "lie outside the box of 48 voxels" in err
    placed = tmp_path / "placed.pdb"
    shifted = heavy.xyz_A + box_centre_A(box, apix)
    from cryohet.io.atomic_model import write_models

    write_models(placed, heavy, shifted[None])
    write_map(tmp_path / "flipped.mrc", np.roll(vol[::-1], 1, axis=0), apix)
    code, err = _run(["--model", str(placed), "--reference_map", str(tmp_path / "flipped.mrc"), "--movie_modes", "0"],
                     tmp_path / "e", capsys)
    assert code == 2 and str(placed) in err and "flipped.mrc" in err and "opposite hands" in err
    code, err = _run(["--model", str(placed), "--reference_map", str(tmp_path / "ref.mrc"), "--n_modes", "3",
                      "--movie_modes", "1", "--n_frames", "3"], tmp_path / "f", capsys)
    assert code == 0, err
    with mrcfile.open(tmp_path / "f" / "mode_01_maps" / "frame_001.mrc") as m:  # the reference map's box
        assert m.data.shape == (box,) * 3 and np.corrcoef(m.data.ravel(), vol.ravel())[0, 1] > 0.99
    # a map: the threshold above every voxel, no threshold, both inputs
    code, err = _run(["--map", str(tmp_path / "ref.mrc"), "--threshold", "1e9", "--n_pseudo", "50"],
                     tmp_path / "g", capsys)
    assert code == 2 and "ref.mrc" in err and "0 voxels lie above the threshold" in err
    code, err = _run(["--map", str(tmp_path / "ref.mrc")], tmp_path / "h", capsys)
    assert code == 2 and "--map needs --threshold" in err
    code, err = _run(["--map", str(tmp_path / "ref.mrc"), "--model", str(placed)], tmp_path / "i", capsys)
    assert code == 2 and "give exactly one of --model" in err


def test_memory_plan_refuses_and_names_the_largest_system() -> None:
    free = free_memory_bytes(torch.device("cpu"))
    fits = max_atoms(free, "torch")
    assert 4 * 8 * (3 * fits) ** 2 <= free  # its Hessian, eigenvectors and workspace fit
    plan_memory(min(fits, 2000), "torch", torch.device("cpu"), "model.pdb")
    with pytest.raises(InputError) as e:
        plan_memory(fits * 2, "torch", torch.device("cpu"), "big.cif")
    msg = str(e.value)
    assert msg.startswith("big.cif: the torch solver's dense") and f"for {fits * 2} atoms needs about" in msg
    assert "--selection ca" in msg
    named = int(re.search(r"enough for (\d+) atoms", msg).group(1))
    assert abs(named - fits) <= 0.05 * fits  # the free memory moves a little between the two looks


def test_subspace_overlaps_of_rotated_degenerate_modes() -> None:
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(30, 4)))[0].T.reshape(4, 10, 3)  # 4 orthonormal modes of 10 atoms
    c, s = np.cos(0.7), np.sin(0.7)
    rotated = q.copy()
    rotated[1], rotated[2] = c * q[1] + s * q[2], -s * q[1] + c * q[2]  # modes 2 and 3 share an eigenvalue
    values = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(subspace_overlaps(rotated, q, values), 1.0, atol=1e-12)
    assert subspace_overlaps(rotated, q, np.array([1.0, 2.0, 2.5, 3.0]))[1] == pytest.approx(c)
    assert subspace_overlaps(q[[1, 0, 2, 3]], q, np.array([1.0, 2.0, 3.0, 4.0]))[:2] == pytest.approx([0, 0])
