"""Choosing the torch device: ``--device auto|cpu|cuda|cuda:N`` (rules in ``cryohet.distributed``)."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from cryohet.errors import InputError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` gives CUDA when present, else CPU; ``cuda`` without CUDA, ``cuda:N`` beyond the visible GPUs
    and names other than auto, cpu, cuda and cuda:N are errors (ValueError).

    ``cuda:N`` also becomes the current CUDA device, so that work placed on plain ``cuda`` lands on GPU N.
    Under torchrun (WORLD_SIZE > 1) the ranks are checked against the visible GPUs here, before any work
    (``cryohet.distributed.rank_device``), and each rank's GPU becomes its current device (the device
    returned stays ``cuda``; ``setup_distributed`` gives the indexed one).
    """
    from cryohet.distributed import check_ranks, ranks_from_env, single_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = torch.device(single_device(name, count))
    if ranks_from_env()[1] > 1:
        mine = torch.device(check_ranks(name))
        if mine.type == "cuda":
            torch.cuda.set_device(mine)  # plain "cuda" is this rank's GPU from here on
    elif dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of ``device`` (a torch.device or its name): the GPU's (``cudaMemGetInfo``) or the machine's
    available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def refuse_unless_fits(need_bytes: float, device: torch.device | str, fraction: float, source: str | os.PathLike,
                       what: str, fits: Callable[[float], Any], advice: str) -> None:
    """Raise an InputError naming ``source`` when ``need_bytes`` exceed ``fraction`` of the device's free
    memory, before anything is allocated: "``what`` needs N GB; <device> has F GB free, enough for
    ``fits(usable_bytes)``: ``advice``"."""
    device = torch.device(device)
    free = free_memory_bytes(device)
    if need_bytes <= fraction * free:
        return
    where = f"the GPU ({device})" if device.type == "cuda" else "this machine"
    raise InputError(source, f"{what} needs about {need_bytes / 1e9:.1f} GB; {where} has {free / 1e9:.1f} GB "
                             f"free, enough for {fits(fraction * free)}: {advice}")
