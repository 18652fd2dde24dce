"""Choosing the torch device: ``--device auto|cpu|cuda|cuda:N`` (rules in ``cryohet.distributed``)."""
from __future__ import annotations

import torch


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
