"""Tensors with string metadata in safetensors files (models, checkpoints): written atomically, never unpickled.

Every file carries the SHA-256 of its tensors' bytes (metadata ``sha256``), checked on reading, so that a
truncated or corrupt file is refused rather than used. A checkpoint keeps the file it replaces as
``<stem>.prev<suffix>`` (``previous_path``), and ``read_checkpoint`` falls back to it when the newest is missing
or unusable: a run killed at any moment, even while writing, leaves one complete checkpoint under a known name.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cryohet.atomic import atomic_path, remove_temporaries
from cryohet.errors import InputError

DIGEST_KEY = "sha256"
T = TypeVar("T")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the names, dtypes, shapes and bytes of ``tensors`` (contiguous CPU tensors), by name."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def previous_path(path: str | Path) -> Path:
    """Where a checkpoint's previous version is kept: ``checkpoint.prev.safetensors`` for ``checkpoint.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], *,
                  checkpoint: bool = False) -> Path:
    """Write ``tensors`` (copied to contiguous CPU tensors) and ``meta`` to ``path`` atomically.

    ``checkpoint``: flush the new file to the disk, then keep the file it replaces at ``previous_path(path)``.
    The file is made in memory and written by Python, so that a full disk raises ``OutputError``.
    """
    from safetensors.torch import save

    path = Path(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = save(cpu, metadata={**meta, DIGEST_KEY: tensors_digest(cpu)})
    with atomic_path(path, keep_previous=previous_path(path) if checkpoint else None, durable=checkpoint) as tmp:
        tmp.write_bytes(data)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; InputError when it is missing, truncated or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # copied into fresh (64-byte aligned) memory: in the file a tensor starts wherever the header's
            # length puts it, and BLAS kernels round differently on differently aligned inputs, so a resumed
            # run would otherwise differ from an uninterrupted one in the last bit, by its metadata's length
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors on garbage
        raise InputError(path, f"not a complete safetensors file: truncated or corrupt ({exc})") from None
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != tensors_digest(tensors):
        raise InputError(path, "corrupt: its tensors do not match the checksum written with them")
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a safetensors file, its tensors unread and unchecked; None when it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own errors on garbage; a missing file raises OSError
        return None


def read_checkpoint(path: str | Path, read: Callable[[Path], T], log: logging.Logger, owner: bool = True
                    ) -> tuple[Path, T] | None:
    """The newest usable of the checkpoint ``path`` and its previous version, as ``read`` gives it (``read``
    raises InputError for an unusable file); None when neither exists.

    An unusable newest one is skipped with a WARNING naming it and the problem and, when ``owner`` (the process
    that writes the checkpoints), renamed to ``<stem>.unusable<suffix>`` so that the next checkpoint does not
    push the good previous one out; the owner also deletes the temporaries of a killed writer.
    InputError naming both files when neither is usable.
    """
    path = Path(path)
    prev = previous_path(path)
    if owner:
        remove_temporaries(path)
    problems: list[str] = []
    for candidate in (path, prev):
        if not candidate.is_file():
            continue
        try:
            value = read(candidate)
        except InputError as exc:
            problems.append(str(exc))
            log.warning("checkpoint %s is unusable: %s", candidate, exc.problem)
            continue
        if candidate == prev:
            _set_aside(path, owner, log)
            log.warning("continuing from the previous checkpoint %s (the newest, %s, is %s)", prev, path.name,
                        "unusable" if problems else "missing: the run stopped while replacing it")
        return candidate, value
    if problems:
        raise InputError(path, f"no usable checkpoint ({'; '.join(problems)}); start again without --resume "
                               "or in another output folder")
    return None


def _set_aside(path: Path, owner: bool, log: logging.Logger) -> None:
    """Rename an unusable checkpoint out of the way (kept for inspection)."""
    if owner and path.is_file():
        aside = path.with_name(f"{path.stem}.unusable{path.suffix}")
        os.replace(path, aside)
        log.warning("the unusable checkpoint was renamed to %s", aside)
