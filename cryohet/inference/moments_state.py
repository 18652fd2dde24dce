"""Checkpoints of the moments' conjugate gradient (``cryohet moments``): after each CG step the mean in the basis,
M̄ (the preconditioner's matrix), the iterate Σ, the residual R, the direction P, ⟨R, Z⟩, the right-hand side's
norm, the steps done and their history, with the settings that must match on resuming. CG is deterministic given
that state, so a resumed run ends as an uninterrupted one; no pass over the particles is repeated. The state is in
the run's ball basis (``moments.BallBasis``), whose eigenvectors within a degenerate eigenvalue differ from one
computation to another (LAPACK with another number of threads): the basis (Φ, norms) is kept too and a resumed run
uses it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cryohet.errors import InputError
from cryohet.io.weights import read_weights, write_weights

FORMAT = "cryohet-moments-cg-2"
MATRICES = ("Mbar", "S", "R", "P")


@dataclass
class CGState:
    mean: torch.Tensor               # (d,) float64 least-squares mean in the basis
    Mbar: torch.Tensor               # (d, d) float64 mean of the M_m
    S: torch.Tensor                  # (d, d) float64 covariance iterate
    R: torch.Tensor                  # (d, d) residual of the normal equations
    P: torch.Tensor                  # (d, d) search direction
    rz: float                        # ⟨R, precondition(R)⟩ (Frobenius)
    norm_rhs: float                  # Frobenius norm of the right-hand side
    iteration: int                   # CG steps done
    history: list[dict[str, float]]
    phi: torch.Tensor                # (voxels, d) float32 the ball basis Φ
    norms: torch.Tensor              # (d,) its functions' squared norms


def save_cg_state(path: Path, state: CGState, settings: dict[str, Any]) -> None:
    """Write ``state`` atomically and durably (the one it replaces kept as the previous checkpoint)."""
    tensors = {"mean": state.mean, **{k: getattr(state, k) for k in MATRICES}}
    tensors = {k: v.detach().cpu().to(torch.float64).contiguous() for k, v in tensors.items()}
    tensors.update(phi=state.phi, norms=state.norms)
    meta = {"format": FORMAT, "iteration": str(state.iteration), "history": json.dumps(state.history),
            "rz": repr(state.rz), "norm_rhs": repr(state.norm_rhs), "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta, checkpoint=True)


def read_cg_state(path: Path) -> tuple[CGState, dict[str, Any]]:
    """The state in ``path`` and its settings; InputError when it is not a complete, consistent CG checkpoint."""
    tensors, meta = read_weights(path)
    if meta.get("format") != FORMAT or not {"mean", *MATRICES, "phi", "norms"} <= tensors.keys():
        raise InputError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
    try:
        state = CGState(tensors["mean"], *(tensors[k] for k in MATRICES), float(meta["rz"]),
                        float(meta["norm_rhs"]), int(meta["iteration"]), json.loads(meta["history"]),
                        tensors["phi"], tensors["norms"])
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    d = len(state.mean)
    if (any(getattr(state, k).shape != (d, d) for k in MATRICES) or len(state.history) != state.iteration
            or state.phi.shape[1:] != (d,) or state.norms.shape != (d,)):
        raise InputError(path, f"inconsistent checkpoint: a basis of {d} with matrices of shapes "
                               f"{[tuple(getattr(state, k).shape) for k in MATRICES]}, Φ of shape "
                               f"{tuple(state.phi.shape)}, step {state.iteration} with {len(state.history)} steps of "
                               "history")
    return state, settings
