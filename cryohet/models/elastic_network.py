"""Elastic-network normal modes: the anisotropic network model (ANM) of a set of atoms, as ProDy 2.6.1 computes it.

Springs of constant ``gamma`` join every pair of atoms closer than ``cutoff_A`` (ProDy's ``buildHessian``: 15 Å,
γ = 1); the Hessian's lowest eigenpairs, less the zero modes (eigenvalue < ``ZERO``: the six rigid-body motions,
six more for each further piece of a network that falls apart), are the modes, ascending, each a unit vector in
3N. Two solvers give the same modes: ProDy itself (``prody.ANM``, CPU, a subset of the eigenpairs by LAPACK) and
a torch one for large systems on the GPU (the dense Hessian built in blocks of atoms, ``torch.linalg.eigh`` in
float64), each after a memory plan that refuses a system too large for the device, naming the largest that fits.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from cryohet.device import refuse_unless_fits
from cryohet.errors import InputError
from cryohet.io.atomic_model import Atoms
from cryohet.io.normal_modes import NormalModes

#: ProDy's threshold below which an eigenvalue counts as zero (``prody.utilities.eigtools.ZERO``).
ZERO = 1e-6
#: Rigid-body (zero) modes of a connected network.
RIGID_MODES = 6
SOLVERS = ("auto", "prody", "torch")
#: ``--solver auto`` takes the torch solver on CUDA from this many atoms on, ProDy otherwise.
AUTO_TORCH_MIN_ATOMS = 1500
#: Dense Hessians held at once while solving, in units of the Hessian's size: torch.linalg.eigh (the matrix, its
#: eigenvectors, LAPACK/cuSOLVER syevd's workspace of about two more); ProDy (its Hessian, scipy's copy, syevr's).
MATRICES_HELD = {"torch": 4, "prody": 3}
#: Fraction of the free memory a solve may plan to use.
MEMORY_FRACTION = 0.9


def hessian_bytes(n_atoms: int) -> int:
    """Bytes of a dense float64 ANM Hessian (3N × 3N)."""
    return 8 * (3 * n_atoms) ** 2


def max_atoms(free_bytes: float, solver: str) -> int:
    """The largest atom count whose solve fits in ``free_bytes`` (``MATRICES_HELD`` Hessians)."""
    return int(np.sqrt(MEMORY_FRACTION * free_bytes / (MATRICES_HELD[solver] * 8)) // 3)


def plan_memory(n_atoms: int, solver: str, device: torch.device, source: str | os.PathLike) -> None:
    """InputError naming ``source`` when the solve of ``n_atoms`` atoms does not fit in the device's free
    memory, with the largest atom count that does."""
    refuse_unless_fits(MATRICES_HELD[solver] * hessian_bytes(n_atoms), device, MEMORY_FRACTION, source,
                       f"the {solver} solver's dense {3 * n_atoms} x {3 * n_atoms} Hessian and eigenvectors for "
                       f"{n_atoms} atoms", lambda usable: f"{max_atoms(usable / MEMORY_FRACTION, solver)} atoms",
                       "use --selection ca (one node per residue) or fewer pseudo-atoms")


def network_pieces(xyz_A: np.ndarray, cutoff_A: float) -> tuple[int, int]:
    """(connected pieces of the network (atoms joined within ``cutoff_A``), its zero modes: 6 per piece, 5 for a
    pair, 3 for a lone atom)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(xyz_A)
    pairs = cKDTree(xyz_A).query_pairs(cutoff_A, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    pieces, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    return int(pieces), int(np.where(sizes == 1, 3, np.where(sizes == 2, 5, RIGID_MODES)).sum())


def anm_hessian(xyz_A: torch.Tensor, cutoff_A: float, gamma: float, block_bytes: int = 1 << 28) -> torch.Tensor:
    """The ANM Hessian (3N, 3N) of positions ``xyz_A`` (N, 3) on their device and dtype: off-diagonal 3×3 blocks
    -γ r rᵀ/|r|² for pairs within ``cutoff_A`` (ProDy's rule, |r| ≤ cutoff), diagonal blocks minus their row's sum.
    Built ``block_bytes`` of (b, N, 3, 3) intermediates at a time."""
    n = xyz_A.shape[0]
    h = torch.zeros(3 * n, 3 * n, dtype=xyz_A.dtype, device=xyz_A.device)
    b = max(1, min(n, block_bytes // (9 * n * xyz_A.element_size())))
    for s in range(0, n, b):
        e = min(n, s + b)
        r = xyz_A[None, :, :] - xyz_A[s:e, None, :]                                  # (b, N, 3)
        d2 = (r * r).sum(-1)
        k = torch.where((d2 <= cutoff_A ** 2) & (d2 > 0), gamma / d2.clamp_min(1e-12), torch.zeros_like(d2))
        blocks = -k[..., None, None] * r[..., :, None] * r[..., None, :]             # (b, N, 3, 3)
        rows = torch.arange(e - s, device=xyz_A.device)
        blocks[rows, rows + s] = -blocks.sum(1)
        h[3 * s:3 * e] = blocks.permute(0, 2, 1, 3).reshape(3 * (e - s), 3 * n)
    return h


def _torch_solve(xyz_A: np.ndarray, n_modes: int, cutoff_A: float, gamma: float, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs by torch.linalg.eigh (float64 on ``device``); the non-zero ones, at most ``n_modes``."""
    h = anm_hessian(torch.as_tensor(xyz_A, dtype=torch.float64, device=device), cutoff_A, gamma)
    values, vectors = torch.linalg.eigh(h)
    del h
    keep = torch.nonzero(values >= ZERO).flatten()[:n_modes]
    return values[keep].cpu().numpy(), vectors[:, keep].T.cpu().numpy()


def _prody_solve(xyz_A: np.ndarray, n_modes: int, cutoff_A: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """ProDy's ``ANM.buildHessian`` and ``calcModes(n_modes, zeros=False)``, its BLAS on torch's thread count."""
    import prody

    prody.confProDy(verbosity="none")
    anm = prody.ANM("cryohet")
    anm.buildHessian(xyz_A, cutoff=float(cutoff_A), gamma=float(gamma))
    anm.calcModes(n_modes=int(n_modes), zeros=False, nproc=torch.get_num_threads())
    return np.asarray(anm.getEigvals(), dtype=np.float64), np.asarray(anm.getEigvecs(), dtype=np.float64).T


def collectivity(modes: np.ndarray) -> np.ndarray:
    """Collectivity (M,) of modes (M, N, 3): exp(-Σ u_i ln u_i) / N with u_i the atom's share of the mode's
    square displacement (Brüschweiler 1995, eq. 5; ProDy's ``calcCollectivity`` without masses)."""
    u2 = (np.asarray(modes, dtype=np.float64) ** 2).sum(-1)
    u2 = u2 / np.sqrt(u2.sum(1, keepdims=True))
    return np.exp(-(u2 * np.log(u2 + np.finfo(float).eps)).sum(1)) / u2.shape[1]


def subspace_overlaps(modes_a: np.ndarray, modes_b: np.ndarray, eigenvalues: np.ndarray, rel: float = 1e-6
                      ) -> np.ndarray:
    """Per mode (M,), the overlap of two sets of unit modes (M, N, 3) of one network: |a·b| for a mode alone; for a
    group of (near-)degenerate eigenvalues (relative gap < ``rel``), where any rotation of the modes within the group
    is as good, the smallest cosine of the principal angles between the two groups' subspaces."""
    a, b = modes_a.reshape(len(modes_a), -1), modes_b.reshape(len(modes_b), -1)
    out = np.empty(len(eigenvalues))
    start = 0
    for k in range(1, len(eigenvalues) + 1):
        if k == len(eigenvalues) or eigenvalues[k] - eigenvalues[k - 1] > rel * abs(eigenvalues[k]):
            out[start:k] = np.linalg.svd(a[start:k] @ b[start:k].T, compute_uv=False).min()
            start = k
    return out


def pick_solver(solver: str, n_atoms: int, device: torch.device) -> str:
    """``auto``: torch on CUDA from ``AUTO_TORCH_MIN_ATOMS`` atoms, ProDy otherwise."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver != "auto":
        return solver
    return "torch" if device.type == "cuda" and n_atoms >= AUTO_TORCH_MIN_ATOMS else "prody"


def anm_modes(atoms: Atoms, n_modes: int, cutoff_A: float = 15.0, gamma: float = 1.0, solver: str = "auto",
              device: torch.device | str = "cpu", selection: str = "", log: logging.Logger | None = None
              ) -> NormalModes:
    """The ``n_modes`` lowest non-zero ANM modes of ``atoms``.

    InputError naming ``atoms.source`` when more modes are asked for than the network has (3N minus its zero
    modes) or the solve does not fit in memory. A network that falls apart at ``cutoff_A`` (more than six zero
    modes) is a WARNING in ``log``.
    """
    device = torch.device(device)
    n = len(atoms)
    pieces, zeros = network_pieces(atoms.xyz_A, cutoff_A)
    available = 3 * n - zeros
    if n_modes > available:
        raise InputError(atoms.source, f"{n_modes} modes requested but the network of {n} atoms has only "
                                       f"{max(available, 0)} non-rigid modes (3N - {zeros}"
                                       f"{f', {pieces} separate pieces' if pieces > 1 else ''}): ask for fewer "
                                       "modes, or use --selection heavy / more pseudo-atoms")
    if pieces > 1 and log is not None:
        log.warning("the network falls apart into %d pieces at a %.3g Å cutoff: %d zero modes are removed, the "
                    "pieces move as rigid bodies in them; raise --cutoff_A to join them", pieces, cutoff_A, zeros)
    chosen = pick_solver(solver, n, device)
    plan_memory(n, chosen, device if chosen == "torch" else torch.device("cpu"), atoms.source)
    if chosen == "torch":
        values, vectors = _torch_solve(atoms.xyz_A, n_modes, cutoff_A, gamma, device)
    else:
        values, vectors = _prody_solve(atoms.xyz_A, n_modes, cutoff_A, gamma)
    if len(values) < n_modes:
        raise InputError(atoms.source, f"{n_modes} modes requested but the network of {n} atoms has only "
                                       f"{len(values)} non-zero modes: ask for fewer modes")
    modes = vectors.reshape(len(values), n, 3)
    return NormalModes(values, modes, atoms, collectivity(modes), float(cutoff_A), float(gamma), selection, chosen)


def extend_to_residues(nm: NormalModes, atoms: Atoms) -> np.ndarray:
    """Modes (M, N_all, 3) of one-node-per-residue modes ``nm`` carried to every atom of ``atoms`` (each atom moves
    with its residue's node, as ProDy's ``extendModel``; not renormalised); atoms of residues without a node
    (ligands) stay still."""
    def key(a: Atoms, i: int) -> tuple:
        return (a.chain[i], int(a.resseq[i]), "" if a.icode is None else a.icode[i])

    node = {key(nm.atoms, i): i for i in range(len(nm.atoms))}
    index = np.array([node.get(key(atoms, i), -1) for i in range(len(atoms))])
    out = np.zeros((len(nm.eigenvalues), len(atoms), 3))
    has = index >= 0
    out[:, has] = nm.modes[:, index[has]]
    return out


def mode_frames(xyz_A: np.ndarray, mode: np.ndarray, rms_A: float, n_frames: int, n_nodes: int) -> np.ndarray:
    """Positions (F, N, 3) along ``mode`` (N, 3): from -``rms_A`` to +``rms_A`` of RMS displacement of the
    ``n_nodes`` network nodes (the displacement of a unit mode scaled by rms_A·√n_nodes)."""
    scale = np.linspace(-1.0, 1.0, n_frames) * rms_A * np.sqrt(n_nodes)
    return np.asarray(xyz_A)[None] + scale[:, None, None] * np.asarray(mode)[None]
