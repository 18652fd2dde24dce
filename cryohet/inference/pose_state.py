"""The poses between rounds of a pose re-search (abinit-het, principal-volumes --refine_poses): the rounds done,
every particle's pose and the history, written after each re-search with the settings that must match on
resuming, so a stopped run continues from its last re-search. Each caller names its own format."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.errors import InputError
from cryohet.io.weights import read_weights, write_weights


@dataclass
class PoseRoundState:
    round: int                       # re-searches done
    euler_deg: np.ndarray            # (N, 3) current poses, RELION Euler angles
    shift_A: np.ndarray              # (N, 2) current origins, Å
    history: list[dict[str, Any]]    # one entry per re-search


def save_pose_state(path: Path, state: PoseRoundState, settings: dict[str, Any], fmt: str) -> None:
    """Write ``state`` atomically (the one it replaces kept as the previous checkpoint)."""
    tensors = {"euler_deg": torch.from_numpy(np.ascontiguousarray(state.euler_deg, dtype=np.float64)),
               "shift_A": torch.from_numpy(np.ascontiguousarray(state.shift_A, dtype=np.float64))}
    meta = {"format": fmt, "round": str(state.round), "history": json.dumps(state.history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta, checkpoint=True)


def read_pose_state(path: Path, fmt: str) -> tuple[PoseRoundState, dict[str, Any]]:
    """The state in ``path`` and its settings; InputError when it is not a complete ``fmt`` file."""
    tensors, meta = read_weights(path)
    if meta.get("format") != fmt or not {"euler_deg", "shift_A"} <= tensors.keys():
        raise InputError(path, f"not a {fmt} file (format {meta.get('format')!r})")
    try:
        state = PoseRoundState(int(meta["round"]), tensors["euler_deg"].numpy(), tensors["shift_A"].numpy(),
                               json.loads(meta["history"]))
        return state, json.loads(meta["settings"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the state's metadata is incomplete ({exc})") from None
