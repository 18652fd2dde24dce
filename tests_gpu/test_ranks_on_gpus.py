"""Tests that need a GPU: run by bench/gpu_check.sh on a machine lent one (CI has none, so they live outside
``tests/``, which CI runs). On a machine without CUDA they fail rather than skip."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_distributed import _rank_lines, _torchrun  # noqa: E402


def test_cuda_is_present() -> None:
    assert torch.cuda.is_available(), "tests_gpu/ runs on a machine with a GPU (bench/gpu_check.sh)"


def test_ranks_against_the_real_gpus(tmp_path: Path) -> None:
    """On a GPU machine: two ranks on one GPU stop with the message; on two or more, nccl ranks on GPUs 0 and 1."""
    res = _torchrun(tmp_path, "cuda")
    if torch.cuda.device_count() == 1:
        assert res.returncode != 0
        assert "2 ranks per node but only 1 GPU(s) visible" in res.stderr, res.stderr[-3000:]
        assert "invalid device ordinal" not in res.stderr
    else:
        assert res.returncode == 0, res.stderr[-3000:]
        assert _rank_lines(res.stdout) == [f"rank {r} of 2 local {r} on cuda:{r} backend nccl sum 3" for r in (0, 1)]
