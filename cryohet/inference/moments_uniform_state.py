"""Checkpoints of ``cryohet moments --poses uniform``: the streamed sums of the invariant moments with the number of
batches done, then each fit's finished work (random starts, frequency-marching stages, the best coefficients so
far, losses and history), with the settings that must match on resuming. The pass and the fits are deterministic
given that state (each start's random draw is replayed), so a resumed run ends as an uninterrupted one.

The coefficients are those of the run's ball basis (``moments.BallBasis``), whose eigenvectors within a degenerate
eigenvalue differ from one computation to another (LAPACK with another number of threads): the basis is kept in
the checkpoint and a resumed run uses it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cryohet.errors import InputError
from cryohet.io.weights import read_weights, write_weights

FORMAT = "cryohet-moments-uniform-1"
FITS = ("map", "low_rank")
BASIS = ("phi", "norms")


@dataclass
class FitProgress:
    """A fit's finished work: random starts and marching stages done, the best loss and its coefficients
    (``best``: "mean", and "comps" for the low-rank model), the relative residuals of the three moments, history."""

    starts: int = 0
    stages: int = 0
    loss: float = math.inf
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {"starts": self.starts, "stages": self.stages, "loss": repr(self.loss), "residuals": self.residuals,
                "history": self.history, "best": sorted(self.best)}


@dataclass
class UniformState:
    """The pass's sums (per defocus group: the invariants (G, T1..T3) complex128, |c| (G, p), images (G,)), the
    batches done, the ball basis (``phi`` (d, d'), ``norms`` (d',)) and the fits' progress."""

    sums: list[torch.Tensor]
    ctf: torch.Tensor
    counts: torch.Tensor
    batches: int
    basis: dict[str, torch.Tensor]
    fits: dict[str, FitProgress] = field(default_factory=lambda: {k: FitProgress() for k in FITS})


def save_uniform_state(path: Path, state: UniformState, settings: dict[str, Any]) -> None:
    """Write ``state`` atomically and durably (the one it replaces kept as the previous checkpoint)."""
    tensors = {f"sum{t + 1}": torch.view_as_real(s.detach().cpu()) for t, s in enumerate(state.sums)}
    tensors.update(ctf=state.ctf, counts=state.counts, **{f"basis.{k}": state.basis[k] for k in BASIS})
    for name, fit in state.fits.items():
        tensors.update({f"{name}.{k}": v for k, v in fit.best.items()})
    meta = {"format": FORMAT, "batches": str(state.batches), "settings": json.dumps(settings, sort_keys=True),
            "fits": json.dumps({name: fit.meta() for name, fit in state.fits.items()})}
    write_weights(path, tensors, meta, checkpoint=True)


def read_uniform_state(path: Path) -> tuple[UniformState, dict[str, Any]]:
    """The state in ``path`` and its settings; InputError when it is not a complete, consistent checkpoint."""
    tensors, meta = read_weights(path)
    names = {"sum1", "sum2", "sum3", "ctf", "counts", *(f"basis.{k}" for k in BASIS)}
    if meta.get("format") != FORMAT or not names <= tensors.keys():
        raise InputError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
    try:
        fits = {}
        for name, m in json.loads(meta["fits"]).items():
            best = {k: tensors[f"{name}.{k}"] for k in m["best"]}
            fits[name] = FitProgress(int(m["starts"]), int(m["stages"]), float(m["loss"]), best,
                                     list(m["residuals"]), list(m["history"]))
        state = UniformState([torch.view_as_complex(tensors[f"sum{t}"].contiguous()) for t in (1, 2, 3)],
                             tensors["ctf"], tensors["counts"], int(meta["batches"]),
                             {k: tensors[f"basis.{k}"] for k in BASIS}, fits)
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    G, (phi, norms) = len(state.counts), (state.basis[k] for k in BASIS)
    if (set(fits) != set(FITS) or any(s.shape[0] != G for s in [*state.sums, state.ctf])
            or phi.ndim != 2 or norms.shape != phi.shape[1:]):
        raise InputError(path, f"inconsistent checkpoint: fits {sorted(fits)}, sums of shapes "
                               f"{[tuple(s.shape) for s in state.sums]} for {G} defocus groups, a basis of shape "
                               f"{tuple(phi.shape)} with {tuple(norms.shape)} norms")
    return state, settings
