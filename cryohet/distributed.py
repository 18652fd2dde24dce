"""Ranks of a distributed run (torchrun): the process group and the device of each rank.

How ranks meet devices (``rank_device``, checked before any work by ``cryohet.device.pick_device`` and again
by ``setup_distributed``):

* ``--device cpu``: every rank runs on the CPU and the group uses gloo, whatever GPUs there are.
* ``--device cuda`` (or ``auto`` with GPUs present): local rank r of a node uses GPU r of the GPUs visible
  there, and the group uses nccl. A node must see at least as many GPUs as it runs ranks
  (torchrun's ``--nproc_per_node``, i.e. ``LOCAL_WORLD_SIZE``); otherwise the run stops at once with an
  error that says so. Choose which GPUs a node uses with ``CUDA_VISIBLE_DEVICES``.
* ``--device cuda:N``: GPU N. With one rank per node it is that rank's GPU; with several ranks on a node
  it is refused (N cannot be every rank's GPU; a rank offset would silently depend on the rank count):
  use ``--device cuda`` and ``CUDA_VISIBLE_DEVICES`` instead.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

_NAME = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def parse_device_name(name: str) -> tuple[str, int | None]:
    """``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` -> (kind, N or None); ValueError for anything else."""
    m = _NAME.fullmatch(str(name).strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N (N the number of a visible GPU, "
                         "counted from 0)")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def _no_gpu(name: str) -> ValueError:
    return ValueError(f"--device {name} was asked for but no CUDA device is available (torch sees no GPU; "
                      "check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu)")


def single_device(name: str, device_count: int) -> str:
    """The device of a single-process run for ``--device name`` when ``device_count`` GPUs are visible.

    Pure (no torch calls), so the rules are testable without GPUs. Returns ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    """
    kind, index = parse_device_name(name)
    if kind == "auto":
        return "cuda" if device_count > 0 else "cpu"
    if kind == "cpu":
        return "cpu"
    if device_count <= 0:
        raise _no_gpu(name)
    if index is None:
        return "cuda"
    if index >= device_count:
        raise ValueError(f"--device cuda:{index}: only {device_count} GPU(s) are visible "
                         f"(cuda:0 to cuda:{device_count - 1}); CUDA_VISIBLE_DEVICES renumbers them from 0")
    return f"cuda:{index}"


def rank_device(world: int, local_world: int, local_rank: int, name: str, device_count: int) -> str:
    """The device of one rank of a run of ``world`` ranks, ``local_world`` of them on this node.

    Pure (no torch calls): the rules of the module doc for ``--device name`` with ``device_count`` GPUs
    visible on this node. Raises ValueError, naming the numbers and the fix, when the ranks cannot be placed.
    """
    kind, index = parse_device_name(name)
    if world <= 1:
        return single_device(name, device_count)
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"local rank {local_rank} is outside the {local_world} rank(s) of this node "
                         "(LOCAL_RANK, LOCAL_WORLD_SIZE)")
    if kind == "cpu" or (kind == "auto" and device_count <= 0):
        return "cpu"
    if device_count <= 0:
        raise _no_gpu(name)
    if index is not None:
        if local_world > 1:
            raise ValueError(f"--device cuda:{index} names one GPU, but {local_world} ranks run on this node: "
                             "use --device cuda (local rank r then uses GPU r; choose the GPUs with "
                             "CUDA_VISIBLE_DEVICES), or start one rank per node (torchrun --nproc_per_node 1)")
        return single_device(name, device_count)
    if local_world > device_count:
        raise ValueError(f"{local_world} ranks per node but only {device_count} GPU(s) visible: each rank needs "
                         f"its own GPU. Start at most {device_count} rank(s) per node (torchrun --nproc_per_node "
                         f"{device_count}), or run all ranks on the CPU with --device cpu (gloo)")
    return f"cuda:{local_rank}"


def ranks_from_env(env: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) as torchrun sets them; local world falls back to local rank + 1
    where LOCAL_WORLD_SIZE is not set (other launchers), so a rank beyond the GPUs is still refused."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "0")) or local + 1
    return rank, world, local, local_world


def check_ranks(name: str) -> str:
    """``rank_device`` for this process (torchrun's environment, the GPUs torch sees)."""
    _, world, local, local_world = ranks_from_env()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank_device(world, local_world, local, name, count)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    ``device`` is the run's device (``cpu``, ``cuda`` or ``cuda:N``); under torchrun each rank gets its own
    (see the module doc), checked before the group is joined. Returns (the ranks, this rank's device).
    """
    rank, world, local, _ = ranks_from_env()
    if world <= 1:
        return Dist(), device
    device = torch.device(check_ranks(str(device)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, owns), device
