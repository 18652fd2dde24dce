"""Checkpoints of a multi-body refinement: everything the next iteration starts from, so a stopped run resumes.

One safetensors file (``cryohet.io.weights``: atomic, checksummed, the previous one kept) holds each particle's
body rotations and shifts, each half-set's body references, the priors' widths, the iterations done with their
history, and the settings that must match on resuming. The refinement is deterministic given that state, so a
resumed run ends as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.inference.em_state import load_checkpoint
from cryohet.io.weights import read_weights, write_weights

FORMAT = "cryohet-multibody-checkpoint-1"


@dataclass
class MultiBodyState:
    iteration: int                  # iterations done
    rotations: np.ndarray           # (N, B, 3, 3) each body's rotation relative to the consensus
    shifts_A: np.ndarray            # (N, B, 2)
    refs: torch.Tensor              # (2, B, n, n, n) each half-set's body references
    sigma_deg: np.ndarray           # (B,) widths of the priors on the rotations
    sigma_px: np.ndarray            # (B,) and on the shifts (pixels of the working lattice)
    history: list[dict[str, Any]]


def save_state(path: Path, state: MultiBodyState, settings: dict[str, Any]) -> None:
    """Write the state atomically, keeping the checkpoint it replaces as the previous one."""
    tensors = {"rotations": torch.from_numpy(np.ascontiguousarray(state.rotations, dtype=np.float64)),
               "shifts_A": torch.from_numpy(np.ascontiguousarray(state.shifts_A, dtype=np.float64)),
               "refs": state.refs.detach().to(torch.float32),
               "sigma_deg": torch.from_numpy(np.asarray(state.sigma_deg, dtype=np.float64)),
               "sigma_px": torch.from_numpy(np.asarray(state.sigma_px, dtype=np.float64))}
    meta = {"format": FORMAT, "iteration": str(state.iteration), "history": json.dumps(state.history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta, checkpoint=True)


def read_state(path: Path) -> tuple[MultiBodyState, dict[str, Any]]:
    """The state in ``path`` and its settings; InputError when the file is missing, truncated, corrupt or not a
    complete multi-body checkpoint."""
    tensors, meta = read_weights(path)
    names = {"rotations", "shifts_A", "refs", "sigma_deg", "sigma_px"}
    if meta.get("format") != FORMAT or not names <= tensors.keys():
        raise InputError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
    try:
        state = MultiBodyState(int(meta["iteration"]), tensors["rotations"].numpy(), tensors["shifts_A"].numpy(),
                               tensors["refs"], tensors["sigma_deg"].numpy(), tensors["sigma_px"].numpy(),
                               json.loads(meta["history"]))
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    n, nb = state.rotations.shape[:2]
    if (state.rotations.shape[2:] != (3, 3) or state.shifts_A.shape != (n, nb, 2) or state.refs.ndim != 5
            or state.refs.shape[:2] != (2, nb) or len(state.history) != state.iteration):
        raise InputError(path, f"inconsistent checkpoint: rotations {tuple(state.rotations.shape)}, shifts "
                               f"{tuple(state.shifts_A.shape)}, references {tuple(state.refs.shape)}, iteration "
                               f"{state.iteration} with {len(state.history)} iterations of history")
    return state, settings


def load_state(path: Path, settings: dict[str, Any], log: logging.Logger) -> tuple[Path, MultiBodyState] | None:
    """The newest usable state of ``path`` or of its previous version and the file it came from; None when there is
    none. InputError when none is usable or its settings differ from ``settings``."""
    return load_checkpoint(path, read_state, settings, log)
