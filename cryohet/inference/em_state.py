"""Checkpoints of an EM over maps (principal volumes, classification): the model after each iteration, so a
stopped run resumes.

One safetensors file holds the maps at the working box (principal volumes: mean and components; classification:
the class maps), the noise spectrum, the iteration and its history, and the settings that must match on resuming
(particles, box, K, limit, prior, mask). Each model names its own format, so one is never resumed as another.
EM is deterministic given that state, so a resumed run ends as an uninterrupted one. The checkpoint it replaces
is kept as ``checkpoint.prev.safetensors`` and used when the newest is missing, truncated or corrupt.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from cryohet.errors import InputError
from cryohet.io.weights import read_checkpoint, read_weights, write_weights

PPCA_FORMAT = "cryohet-ppca-checkpoint-1"
S = TypeVar("S")


@dataclass
class EMState:
    vols: torch.Tensor                  # (maps, n, n, n) float32
    noise: torch.Tensor                 # (shells,) noise variance per shell
    iteration: int                      # EM iterations done
    history: list[dict[str, float]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # a model's own further tensors


def mask_digest(mask: torch.Tensor) -> str:
    """Short fingerprint of the component mask (a different mask must not be resumed)."""
    return hashlib.sha256(mask.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def save_state(path: Path, state: EMState, settings: dict[str, Any], fmt: str = PPCA_FORMAT) -> None:
    """Write the EM state atomically, keeping the checkpoint it replaces as the previous one."""
    tensors = {**{k: v.detach().cpu().contiguous() for k, v in state.extra.items()},
               "vols": state.vols.detach().cpu().contiguous(), "noise": state.noise.detach().cpu().contiguous()}
    meta = {"format": fmt, "iteration": str(state.iteration), "history": json.dumps(state.history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, tensors, meta, checkpoint=True)


def read_state(path: Path, fmt: str = PPCA_FORMAT) -> tuple[EMState, dict[str, Any]]:
    """The state in ``path`` and the settings it was written with; InputError when the file is missing,
    truncated, corrupt or not a complete checkpoint of format ``fmt``."""
    tensors, meta = read_weights(path)
    if meta.get("format") != fmt or not {"vols", "noise"} <= tensors.keys():
        raise InputError(path, f"not a {fmt} file (format {meta.get('format')!r})")
    try:
        state = EMState(tensors["vols"], tensors["noise"], int(meta["iteration"]), json.loads(meta["history"]),
                        {k: v for k, v in tensors.items() if k not in ("vols", "noise")})
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    if state.vols.ndim != 4 or state.noise.ndim != 1 or len(state.history) != state.iteration:
        raise InputError(path, f"inconsistent checkpoint: maps of shape {tuple(state.vols.shape)}, noise of shape "
                               f"{tuple(state.noise.shape)}, iteration {state.iteration} with "
                               f"{len(state.history)} iterations of history")
    return state, settings


def load_state(path: Path, settings: dict[str, Any], log: logging.Logger, fmt: str = PPCA_FORMAT
               ) -> tuple[Path, EMState] | None:
    """The newest usable state of the checkpoint ``path`` or of its previous version (``read_checkpoint``) and the
    file it came from; None when there is none. InputError when none is usable or its settings differ."""
    return load_checkpoint(path, lambda p: read_state(p, fmt), settings, log)


def load_checkpoint(path: Path, read: Callable[[Path], tuple[S, dict[str, Any]]], settings: dict[str, Any],
                    log: logging.Logger) -> tuple[Path, S] | None:
    """The newest usable state that ``read`` (state, settings) gets from the checkpoint ``path`` or its previous
    version (``read_checkpoint``) and the file it came from; None when there is none. InputError when none is
    usable or it was written with other settings (naming the checkpoint and every setting that differs)."""
    found = read_checkpoint(path, read, log)
    if found is None:
        return None
    used, (state, saved) = found
    diff = [f"{k}: {saved.get(k)!r} (checkpoint) vs {v!r} (asked)" for k, v in settings.items() if saved.get(k) != v]
    if diff:
        raise InputError(used, "the checkpoint was written with other settings; use the same ones or a new output "
                               "folder: " + "; ".join(diff))
    return used, state
