"""Tensors with string metadata in safetensors files (models, checkpoints): written atomically, never unpickled."""
from __future__ import annotations

from pathlib import Path

import torch

from cryohet.atomic import atomic_path
from cryohet.errors import InputError


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write ``tensors`` (copied to contiguous CPU tensors) and ``meta`` to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; InputError when it is missing or not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors on garbage
        raise InputError(path, f"not a safetensors model file ({exc})") from None
    return tensors, meta
