"""Checkpoints of the principal-volumes EM: the model after each iteration, so a stopped run resumes.

One safetensors file holds the maps (mean and components at the working box), the noise spectrum, the
iteration and its history, and the settings that must match on resuming (particles, box, K, limit, prior,
mask). EM is deterministic given that state, so a resumed run ends as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cryohet.errors import InputError
from cryohet.io.weights import read_weights, write_weights

FORMAT = "cryohet-ppca-checkpoint-1"


@dataclass
class EMState:
    vols: torch.Tensor                  # (K + 1, n, n, n) float32: mean, then components
    noise: torch.Tensor                 # (shells,) noise variance per shell
    iteration: int                      # EM iterations done
    history: list[dict[str, float]]


def mask_digest(mask: torch.Tensor) -> str:
    """Short fingerprint of the component mask (a different mask must not be resumed)."""
    return hashlib.sha256(mask.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def save_state(path: Path, state: EMState, settings: dict[str, Any]) -> None:
    tensors = {"vols": state.vols.detach().cpu().contiguous(), "noise": state.noise.detach().cpu().contiguous()}
    meta = {"format": FORMAT, "iteration": str(state.iteration), "history": json.dumps(state.history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta)


def load_state(path: Path, settings: dict[str, Any]) -> EMState:
    """The state in ``path``; InputError when it is not a principal-volumes checkpoint or its settings differ."""
    tensors, meta = read_weights(path)
    if meta.get("format") != FORMAT or not {"vols", "noise"} <= tensors.keys():
        raise InputError(path, f"not a principal-volumes checkpoint (format {meta.get('format')!r})")
    saved = json.loads(meta["settings"])
    diff = [f"{k}: {saved.get(k)!r} (checkpoint) vs {v!r} (asked)" for k, v in settings.items() if saved.get(k) != v]
    if diff:
        raise InputError(path, "the checkpoint was written with other settings; use the same ones or a new output "
                               "folder: " + "; ".join(diff))
    return EMState(tensors["vols"], tensors["noise"], int(meta["iteration"]), json.loads(meta["history"]))
