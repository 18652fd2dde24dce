"""Runs of train-vae on two gloo ranks under torchrun (CPU), for the tests that compare them with one rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_vae_on_two_ranks(values: dict[str, Any], out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``train-vae`` with ``values`` into ``out`` on two CPU ranks (one thread each); the script sits beside
    ``out``."""
    script = out.parent / f"{out.name}_ddp.py"
    script.write_text("from cryohet.runner import run_method\nfrom cryohet.methods.train_vae import METHOD\n"
                      f"run_method(METHOD, {values!r}, {str(out)!r})\n")
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=timeout)
