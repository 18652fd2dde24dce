"""Atomic models (PDB / mmCIF through gemmi): read a selection of atoms, write multi-model files, check a model
against a map's box and hand.

Frame: coordinates stay in the file's frame, which for a model placed in a map is the map's frame as RELION and
ChimeraX place it (map origin 0): voxel i is at i·apix Å, so the box centre (voxel box//2 on each axis) is at
``box_centre_A(box, apix)``. To render atoms as the particles see them::

    gaussian_map(atoms.xyz_A, atoms.weight, box, apix, resolution_A, box_centre_A(box, apix))

(``cryohet.simulate.density.atoms_to_map`` with ``centre_A=box_centre_A(box, apix)`` does the same).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.geometry.gaussians import gaussian_map, lowpass_map
from cryohet.io.mrc import read_map_like

SELECTIONS = ("ca", "heavy", "all")
#: Correlation below which a model is taken as not placed in the map at all (``check_hand``).
MIN_FIT_CORRELATION = 0.3
CIF_SUFFIXES = (".cif", ".mmcif")
#: Atom serial numbers of a PDB file stop here: larger models are written as mmCIF.
PDB_MAX_ATOMS = 99_999


@dataclass
class Atoms:
    """Selected atoms of a model, arrays in file order (first model)."""

    xyz_A: np.ndarray     # (N, 3) float64, Å, the file's frame (x, y, z)
    weight: np.ndarray    # (N,) float64 electrons to render (atomic number x occupancy; with selection "ca" the
                          # sum over the residue's heavy atoms: one Gaussian per residue)
    chain: np.ndarray     # (N,) str
    resseq: np.ndarray    # (N,) int
    resname: np.ndarray   # (N,) str
    name: np.ndarray      # (N,) str, atom name
    element: np.ndarray   # (N,) str
    source: Path
    b_factor: np.ndarray | None = None  # (N,) float64 Å², as in the file (None when made without a file)
    icode: np.ndarray | None = None     # (N,) str, insertion codes ('' for none)

    def __len__(self) -> int:
        return len(self.xyz_A)


def load_structure(path: str | os.PathLike) -> gemmi.Structure:
    """Read a PDB/mmCIF file: first model only, without hydrogens, waters and alternative conformations (the first
    conformer kept, with the summed occupancy of all).

    Ligands are kept (they scatter too). Raises InputError when the file cannot be read or has no atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "atomic model not found")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(path, f"cannot read the atomic model ({exc})") from None
    if len(st) == 0:
        raise InputError(path, "the atomic model has no models/atoms")
    while len(st) > 1:
        del st[len(st) - 1]
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()
    split = _altloc_occupancy(st)
    st.remove_alternative_conformations()
    for chain, res, atom in iter_atoms(st):  # the conformer kept stands for the whole atom
        atom.occ = split.get((chain.name, str(res.seqid), atom.name), atom.occ)
    st.remove_empty_chains()
    if st[0].count_atom_sites() == 0:
        raise InputError(path, "the atomic model has no (non-hydrogen, non-water) atoms")
    return st


def _altloc_occupancy(structure: gemmi.Structure) -> dict[tuple[str, str, str], float]:
    """(chain, residue number, atom name) -> the summed occupancy of the atom's alternative conformations (at
    most 1), for the atoms that have them."""
    total: dict[tuple[str, str, str], float] = {}
    for chain, res, atom in iter_atoms(structure):
        if atom.has_altloc():
            key = (chain.name, str(res.seqid), atom.name)
            total[key] = min(1.0, total.get(key, 0.0) + atom.occ)
    return total


def iter_atoms(structure: gemmi.Structure) -> Iterator[tuple[gemmi.Chain, gemmi.Residue, gemmi.Atom]]:
    """(chain, residue, atom) of every atom of the first model, in file order."""
    for chain in structure[0]:
        for res in chain:
            for atom in res:
                yield chain, res, atom


def atom_coords(structure: gemmi.Structure) -> np.ndarray:
    """Atom positions (N, 3) in Å, (x, y, z), in file order (first model)."""
    return np.array([a.pos.tolist() for _, _, a in iter_atoms(structure)], dtype=np.float64).reshape(-1, 3)


def atom_weights(structure: gemmi.Structure) -> np.ndarray:
    """Scattering weight of each atom (N,): its atomic number times its occupancy."""
    return np.array([_electrons(a) for _, _, a in iter_atoms(structure)], dtype=np.float64)


def _electrons(atom: gemmi.Atom) -> float:
    return max(atom.element.atomic_number, 1) * atom.occ


def _representative(res: gemmi.Residue) -> tuple[str | None, bool]:
    """(name of the atom that stands for the residue in a "ca" selection, whether the residue is polymer).

    Amino acids: CA; nucleotides: P, or C4' for a nucleotide without its phosphate (a chain's 5' end)."""
    info = gemmi.find_tabulated_residue(res.name)
    if info is not None and info.is_amino_acid():
        return "CA", True
    if info is not None and info.is_nucleic_acid():
        return ("P" if res.find_atom("P", "*") is not None else "C4'"), True
    return None, False


def read_atoms(path: str | os.PathLike, selection: str = "ca") -> Atoms:
    """Atoms of a PDB/mmCIF model (first model; waters and hydrogens dropped).

    ``selection``: "ca" (one atom per polymer residue: Cα of amino acids, P of nucleotides, its weight the
    residue's heavy atoms' electrons), "heavy" (every non-hydrogen atom, ligands included) or "all" (the same
    atoms: hydrogens and waters are never read). InputError naming the file when it cannot be read, nothing is
    selected, or amino acids lack their Cα (named).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    path = Path(path)
    st = load_structure(path)
    rows: list[tuple[gemmi.Chain, gemmi.Residue, gemmi.Atom, float]] = []
    missing: list[str] = []
    if selection == "ca":
        for chain in st[0]:
            for res in chain:
                rep, polymer = _representative(res)
                if not polymer:
                    continue
                atom = next((a for a in res if a.name == rep), None)
                if atom is None:
                    missing.append(f"{chain.name}:{res.name}{res.seqid.num}{res.seqid.icode.strip()}")
                    continue
                rows.append((chain, res, atom, sum(_electrons(a) for a in res)))
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise InputError(path, f"{len(missing)} amino-acid residue(s) lack their CA atom: "
                                   f"{', '.join(missing[:10])}{more}; complete the model or use --selection heavy")
    else:
        rows = [(c, r, a, _electrons(a)) for c, r, a in iter_atoms(st)]
    if not rows:
        raise InputError(path, f"no atoms selected by selection {selection!r} (no amino acids or nucleotides)")
    return Atoms(
        xyz_A=np.array([a.pos.tolist() for _, _, a, _ in rows], dtype=np.float64).reshape(-1, 3),
        weight=np.array([w for *_, w in rows], dtype=np.float64),
        chain=np.array([c.name for c, *_ in rows], dtype=str),
        resseq=np.array([r.seqid.num for _, r, _, _ in rows], dtype=np.int64),
        resname=np.array([r.name for _, r, _, _ in rows], dtype=str),
        name=np.array([a.name for _, _, a, _ in rows], dtype=str),
        element=np.array([a.element.name for _, _, a, _ in rows], dtype=str),
        source=path,
        b_factor=np.array([a.b_iso for _, _, a, _ in rows], dtype=np.float64),
        icode=np.array([r.seqid.icode.strip() for _, r, _, _ in rows], dtype=str),
    )


def _model(atoms: Atoms, xyz_A: np.ndarray, number: int) -> gemmi.Model:
    """One gemmi model of ``atoms`` at positions ``xyz_A`` (N, 3); residues where (chain, number, insertion
    code, name) changes, chains where the chain name changes."""
    model = gemmi.Model(number)
    icode = atoms.icode if atoms.icode is not None else np.full(len(atoms), "")
    bfac = atoms.b_factor if atoms.b_factor is not None else np.zeros(len(atoms))
    chain = res = None
    key = None
    for i in range(len(atoms)):
        k = (atoms.chain[i], int(atoms.resseq[i]), icode[i], atoms.resname[i])
        if chain is None or k[0] != key[0]:
            chain = model.add_chain(gemmi.Chain(str(k[0])))
        if key != k:
            r = gemmi.Residue()
            r.name, r.seqid = str(k[3]), gemmi.SeqId(k[1], str(k[2]) or " ")
            res = chain.add_residue(r)
            key = k
        a = gemmi.Atom()
        a.name, a.element = str(atoms.name[i]), gemmi.Element(str(atoms.element[i]))
        a.pos, a.occ, a.b_iso = gemmi.Position(*map(float, xyz_A[i])), 1.0, float(bfac[i])
        res.add_atom(a)
    return model


def model_suffix(source: str | os.PathLike | None, n_atoms: int) -> str:
    """The suffix of models written from ``source`` (the file they come from, if any): ".cif" when it is mmCIF or
    when ``n_atoms`` is beyond PDB's atom numbers, else ".pdb"."""
    from_cif = source is not None and Path(source).suffix.lower() in CIF_SUFFIXES
    return ".cif" if from_cif or n_atoms > PDB_MAX_ATOMS else ".pdb"


def write_models(path: str | os.PathLike, atoms: Atoms, frames: np.ndarray) -> None:
    """Write ``frames`` (F, N, 3) Å of ``atoms`` as one multi-model PDB, or mmCIF when the suffix is .cif/.mmcif
    (ChimeraX opens it as one model with F coordinate sets). Written under a temporary name, then renamed."""
    path = Path(path)
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[1:] != (len(atoms), 3):
        raise ValueError(f"frames of shape {frames.shape} for {len(atoms)} atoms")
    st = gemmi.Structure()
    st.name = path.stem
    for f, xyz in enumerate(frames):
        st.add_model(_model(atoms, xyz, f + 1))
    st.setup_entities()
    with atomic_path(path) as tmp:
        if path.suffix.lower() in CIF_SUFFIXES:
            st.make_mmcif_document().write_file(str(tmp))
        else:
            st.write_pdb(str(tmp))


def box_centre_A(box: int, apix: float) -> np.ndarray:
    """The box centre (3,) Å, (x, y, z): voxel box//2 on each axis, map origin 0."""
    return np.full(3, (box // 2) * float(apix))


def check_in_box(atoms: Atoms, box: int, apix: float) -> None:
    """InputError naming ``atoms.source`` when atoms lie outside the box (voxel centres 0 to (box-1)·apix Å)."""
    top = (box - 1) * float(apix)
    outside = np.maximum(-atoms.xyz_A, atoms.xyz_A - top).max(axis=1)
    n_out = int((outside > 0).sum())
    if n_out:
        raise InputError(atoms.source, f"{n_out} of {len(atoms)} atoms lie outside the box of {box} voxels of "
                                       f"{apix:g} Å (0 to {top:.1f} Å on each axis), up to {outside.max():.1f} Å "
                                       "outside: the model must be placed in the map's frame (map origin 0, as "
                                       "ChimeraX saves a fitted model) and the voxel size must match")


def check_hand(atoms: Atoms, volume: np.ndarray, apix: float, resolution_A: float,
               source_map: str | os.PathLike) -> float:
    """Correlation of the atoms rendered at ``resolution_A`` with ``volume`` (z, y, x) low-passed alike.

    InputError naming the model and ``source_map`` when the model mirrored through the box centre (z -> -z)
    fits better (the map or the model has the other hand) or when neither fits (correlation below
    ``MIN_FIT_CORRELATION``: the model is not placed in the map)."""
    volume = np.asarray(volume, dtype=np.float32)
    box = volume.shape[-1]
    centre = box_centre_A(box, apix)
    mirrored = atoms.xyz_A.copy()
    mirrored[:, 2] = 2 * centre[2] - mirrored[:, 2]
    target = lowpass_map(torch.from_numpy(np.ascontiguousarray(volume)), apix, resolution_A).numpy().ravel()
    cc = [float(np.corrcoef(gaussian_map(xyz, atoms.weight, box, apix, resolution_A, centre).ravel(), target)[0, 1])
          for xyz in (atoms.xyz_A, mirrored)]
    cc = [c if np.isfinite(c) else 0.0 for c in cc]
    if cc[1] > cc[0] and cc[1] >= MIN_FIT_CORRELATION:
        raise InputError(atoms.source, f"the model fits {source_map} better mirrored (correlation {cc[1]:.2f}) than "
                                       f"as it is ({cc[0]:.2f}): the map and the model have opposite hands; flip "
                                       "the map's hand (relion_image_handler --invert_hand) or use the other model")
    if cc[0] < MIN_FIT_CORRELATION:
        raise InputError(atoms.source, f"the model does not fit {source_map} (correlation {cc[0]:.2f} at "
                                       f"{resolution_A:g} Å, below {MIN_FIT_CORRELATION}): place the model in the "
                                       "map (map origin 0) and check the voxel size")
    return cc[0]


def check_model(atoms: Atoms, box: int, apix: float, resolution_A: float, reference_map: str | os.PathLike = "",
                log: logging.Logger | None = None) -> float | None:
    """The checks of a model before it is fitted to particles of ``box`` px at ``apix`` Å/px: inside the box
    (``check_in_box``) and, given a ``reference_map`` (a path, "" for none; ``--reference_map``: same box and pixel
    size), placed in it with the right hand (``check_hand`` at ``resolution_A``). Returns that correlation (None
    without a map), logged to ``log``."""
    check_in_box(atoms, box, apix)
    if not reference_map:
        return None
    vol = read_map_like(reference_map, box, apix, "--reference_map")
    cc = check_hand(atoms, vol, apix, resolution_A, reference_map)
    if log is not None:
        log.info("the model fits %s with correlation %.3f", reference_map, cc)
    return cc
