"""Ranks and devices: --device names, ranks against visible GPUs (pure rules, tested without GPUs), the error
before any work, and real torchrun runs (two gloo ranks on the CPU; on a GPU machine, ranks against its GPUs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cryohet import distributed
from cryohet.cli import main as cli_main
from cryohet.device import pick_device
from cryohet.distributed import parse_device_name, rank_device, ranks_from_env, setup_distributed, single_device

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """torch sees ``count`` GPUs (nothing is ever placed on them in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def torchrun_env(monkeypatch: pytest.MonkeyPatch, world: int, local_world: int | None, local_rank: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


@pytest.mark.parametrize("name,parsed", [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                         ("cuda:0", ("cuda", 0)), ("CUDA:3", ("cuda", 3)), (" cuda:12 ", ("cuda", 12))])
def test_device_names(name: str, parsed: tuple) -> None:
    assert parse_device_name(name) == parsed


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "cuda:-1", "cpu:0", "auto:1", "", "cuda:0,1", "mps"])
def test_bad_device_names_are_refused_by_name(name: str, no_torchrun: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"expected auto, cpu, cuda or cuda:N"):
        parse_device_name(name)
    with pytest.raises(ValueError, match=f"--device {name!r}"):
        pick_device(name)


def test_single_process_devices() -> None:
    assert single_device("auto", 0) == "cpu" and single_device("auto", 2) == "cuda"
    assert single_device("cpu", 4) == "cpu"
    assert single_device("cuda", 1) == "cuda" and single_device("cuda:1", 2) == "cuda:1"
    with pytest.raises(ValueError, match=r"--device cuda:2: only 2 GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        single_device("cuda:2", 2)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device {name} was asked for but no CUDA device is available"):
            single_device(name, 0)


def test_more_ranks_than_gpus_is_refused_naming_the_numbers_and_the_fix() -> None:
    """The known failure: torchrun --nproc_per_node 2 on a 1-GPU machine ('invalid device ordinal' before)."""
    for rank in (0, 1):  # every rank refuses, not only the one without a GPU
        for name in ("cuda", "auto"):
            with pytest.raises(ValueError) as err:
                rank_device(world=2, local_world=2, local_rank=rank, name=name, device_count=1)
            msg = str(err.value)
            assert "2 ranks per node but only 1 GPU(s) visible" in msg
            assert "torchrun --nproc_per_node 1" in msg and "--device cpu (gloo)" in msg
    with pytest.raises(ValueError, match="8 ranks per node but only 4 GPU"):
        rank_device(16, 8, 5, "cuda", 4)


def test_local_ranks_map_onto_the_visible_gpus() -> None:
    assert [rank_device(4, 4, r, "cuda", 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device(2, 2, r, "auto", 8) for r in range(2)] == ["cuda:0", "cuda:1"]
    # two nodes of two ranks each: the local rank picks the GPU
    assert [rank_device(4, 2, r, "cuda", 2) for r in (0, 1)] == ["cuda:0", "cuda:1"]


def test_cpu_ranks_use_the_cpu_whatever_the_gpus() -> None:
    assert {rank_device(3, 3, r, "cpu", n) for r in range(3) for n in (0, 1, 8)} == {"cpu"}
    assert rank_device(2, 2, 1, "auto", 0) == "cpu"  # no GPU: auto is the CPU, every rank
    with pytest.raises(ValueError, match="no CUDA device is available"):
        rank_device(2, 2, 1, "cuda", 0)


def test_cuda_n_is_that_gpu_with_one_rank_per_node_and_refused_with_several() -> None:
    assert rank_device(1, 1, 0, "cuda:1", 2) == "cuda:1"
    assert rank_device(4, 1, 0, "cuda:1", 2) == "cuda:1"  # one rank on each of 4 nodes
    with pytest.raises(ValueError, match=r"--device cuda:1: only 1 GPU\(s\) are visible"):
        rank_device(4, 1, 0, "cuda:1", 1)
    with pytest.raises(ValueError, match=r"--device cuda:0 names one GPU, but 2 ranks run on this node: use "
                                         r"--device cuda .*CUDA_VISIBLE_DEVICES"):
        rank_device(2, 2, 0, "cuda:0", 2)
    with pytest.raises(ValueError, match="local rank 2 is outside the 2 rank"):
        rank_device(4, 2, 2, "cuda", 4)


def test_ranks_from_env() -> None:
    assert ranks_from_env({}) == (0, 1, 0, 1)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert ranks_from_env(env) == (3, 4, 1, 2)
    # a launcher without LOCAL_WORLD_SIZE: the rank beyond the GPUs still refuses
    assert ranks_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == (1, 2, 1, 2)


def test_pick_device_refuses_the_ranks_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    fake_gpus(monkeypatch, 1)
    torchrun_env(monkeypatch, world=2, local_world=2, local_rank=1)
    with pytest.raises(ValueError, match="2 ranks per node but only 1 GPU"):
        pick_device("auto")
    torchrun_env(monkeypatch, world=2, local_world=None, local_rank=1)  # no LOCAL_WORLD_SIZE
    with pytest.raises(ValueError, match="2 ranks per node but only 1 GPU"):
        pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
    # the command stops with the message (exit 2) before it reads anything: the particles do not even exist
    rc = cli_main(["train-vae", "--particles", str(tmp_path / "missing.star"), "--o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "2 ranks per node but only 1 GPU(s) visible" in err and "missing.star" not in err


def test_pick_device_makes_the_chosen_gpu_current(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    torchrun_env(monkeypatch, world=1, local_world=1, local_rank=0)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    torchrun_env(monkeypatch, world=2, local_world=2, local_rank=1)  # rank 1: GPU 1, before any work
    assert pick_device("auto") == torch.device("cuda") and current[-1] == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU, but 2 ranks run on this node"):
        pick_device("cuda:1")


def test_setup_distributed_refuses_before_joining_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1)
    torchrun_env(monkeypatch, world=2, local_world=2, local_rank=0)

    def joined(*args: object, **kwargs: object) -> None:
        raise AssertionError("the process group was joined")

    monkeypatch.setattr(distributed.dist, "init_process_group", joined)
    with pytest.raises(ValueError, match="--nproc_per_node 1"):
        setup_distributed(torch.device("cuda"))


def test_cuda_beyond_the_gpus_and_without_cuda(no_torchrun: pytest.MonkeyPatch) -> None:
    fake_gpus(no_torchrun, 0)
    with pytest.raises(ValueError, match="no CUDA device is available"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")
    fake_gpus(no_torchrun, 2)
    with pytest.raises(ValueError, match=r"--device cuda:5: only 2 GPU"):
        pick_device("cuda:5")


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from cryohet.distributed import setup_distributed
d, device = setup_distributed(torch.device(sys.argv[1]))
t = torch.ones(1, device=device) * (d.rank + 1)
dist.all_reduce(t)
print(f"rank {d.rank} of {d.world} local {d.local_rank} on {device} backend {dist.get_backend()} sum {int(t.item())}",
      flush=True)
d.barrier()
d.close()
"""


def _torchrun(tmp_path: Path, device: str, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), device], env=env, capture_output=True, text=True, timeout=120)


def _rank_lines(stdout: str) -> list[str]:
    """The ranks' report lines, sorted (two ranks share one stdout: their lines may run together)."""
    return sorted(re.findall(r"rank \d+ of \d+ local \d+ on \S+? backend \w+ sum \d+", stdout))


def test_two_gloo_ranks_under_torchrun(tmp_path: Path) -> None:
    res = _torchrun(tmp_path, "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _rank_lines(res.stdout) == ["rank 0 of 2 local 0 on cpu backend gloo sum 3",
                                       "rank 1 of 2 local 1 on cpu backend gloo sum 3"]
