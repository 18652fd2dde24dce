"""ANM normal modes: our torch solver side by side with ProDy 2.6.1's ``ANM`` on the same systems.

    .venv/bin/python bench/bench_nma.py [--device cuda] [--threads 1] [--n_modes 20]

Systems (real proteins): the bundled adenylate kinase (4AKE chain A) as Cα (214 nodes) and heavy atoms (1656), and
the larger GluA3 N-terminal-domain dimer of dimers (PDB 3O21, ProDy's test file: 4 chains) as Cα (1489 nodes) and,
where the memory plan allows, heavy atoms (12215). For each: ProDy's ``buildHessian`` + ``calcModes(n, zeros=False)``
(scipy's LAPACK, a subset of eigenpairs) and ours (``anm_modes(solver="torch")``: blocked dense Hessian, full
``torch.linalg.eigh`` in float64 on ``--device``), both with the zero modes removed. Scores: the largest relative
eigenvalue error, the smallest mode overlap (subspaces of near-degenerate eigenvalues compared as wholes), each
solve's wall time (the best of ``--repeats``) and the ratio torch / ProDy. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import prody
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.device import free_memory_bytes  # noqa: E402
from cryohet.io.atomic_model import read_atoms  # noqa: E402
from cryohet.models.elastic_network import (  # noqa: E402
    anm_modes,
    max_atoms,
    subspace_overlaps,
)
from cryohet.simulate.molecules import DEFAULT_MOLECULE  # noqa: E402

PRODY_DATA = Path(prody.__file__).resolve().parent / "tests" / "datafiles"
SYSTEMS = (("adenylate kinase", DEFAULT_MOLECULE, "ca"), ("adenylate kinase", DEFAULT_MOLECULE, "heavy"),
           ("GluA3 NTD (3O21)", PRODY_DATA / "pdb3o21.pdb", "ca"), ("GluA3 NTD (3O21)", PRODY_DATA / "pdb3o21.pdb",
                                                                    "heavy"))


def best_time(fn, repeats: int):
    """(the result, the shortest wall time of ``repeats`` calls, s)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both solvers")
    ap.add_argument("--n_modes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max_nodes", type=int, default=5000, help="skip larger systems (a full eigh of 3N is O(N³): "
                    "12215 heavy atoms take hours on one CPU thread, minutes on a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prody.confProDy(verbosity="none")
    device = torch.device(args.device)
    limit_torch = max_atoms(free_memory_bytes(device), "torch")
    limit_prody = max_atoms(free_memory_bytes(torch.device("cpu")), "prody")
    print(f"device {device}, {args.threads} thread(s); largest system the memory plan allows: torch {limit_torch} "
          f"atoms, ProDy {limit_prody} atoms\n")
    print("| system | nodes | ProDy s | torch s | torch / ProDy | max eigenvalue error | min mode overlap |")
    print("|---|---|---|---|---|---|---|")
    for name, path, selection in SYSTEMS:
        nodes = read_atoms(path, selection)
        if len(nodes) > min(limit_torch, limit_prody, args.max_nodes):
            why = "beyond the memory plan" if len(nodes) > min(limit_torch, limit_prody) else "beyond --max_nodes"
            print(f"| {name} {selection} | {len(nodes)} | - | - | - | {why} | - |")
            continue
        ref, t_ref = best_time(lambda n=nodes: anm_modes(n, args.n_modes, solver="prody"), args.repeats)
        ours, t_ours = best_time(lambda n=nodes: anm_modes(n, args.n_modes, solver="torch", device=device),
                                 args.repeats)
        err = float(np.abs(ours.eigenvalues / ref.eigenvalues - 1).max())
        overlap = float(subspace_overlaps(ours.modes, ref.modes, ref.eigenvalues).min())
        print(f"| {name} {selection} | {len(nodes)} | {t_ref:.3f} | {t_ours:.3f} | {t_ours / t_ref:.2f} | {err:.1e} "
              f"| {overlap:.6f} |", flush=True)


if __name__ == "__main__":
    main()
