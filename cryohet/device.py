"""Choosing the torch device."""
from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` gives CUDA when present, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return dev
