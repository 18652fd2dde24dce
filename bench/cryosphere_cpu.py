"""Run cryoSPHERE's own training loop and latent sampling on the CPU (run with cryoSPHERE's Python, not cryohet's).

    /work/peers/cryosphere-venv/bin/python bench/cryosphere_cpu.py parameters.yaml OUT_DIR [--threads 1]

cryoSPHERE 0.6.1 runs on CUDA only: ``cryosphere_train`` starts ``torch.cuda.device_count()`` processes (none on a
CPU machine, so it returns at once and trains nothing), each of which calls ``torch.cuda.set_device`` and opens an
NCCL process group; its DDP wrappers pass ``device_ids=[gpu]``. This script changes only that plumbing: one gloo
process group of size 1, DDP without device ids, ``monitor_training`` told it is rank 0 (it saves the checkpoints only
there). The training step (``cryosphere_train.start_training``), the model, the losses and the input reading are
cryoSPHERE's, unchanged, with the yaml's ``device: CPU``. Writes OUT_DIR/z.npy (the encoder's latent means, rows in
particle order, as ``cryosphere_analyze`` computes them), OUT_DIR/ca_A.npy (the decoded Cα positions of every
particle, Å, the base structure's frame) and OUT_DIR/epoch_seconds.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def cpu_ddp(module: torch.nn.Module, device_ids: list | None = None) -> DistributedDataParallel:
    """cryoSPHERE's ``DDP(module, device_ids=[gpu])`` for a CPU module (gloo)."""
    return DistributedDataParallel(module)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("yaml", help="cryoSPHERE parameters.yaml")
    ap.add_argument("out", type=Path, help="folder for z.npy, ca_A.npy and epoch_seconds.json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)

    from cryosphere import cryosphere_train as ct
    from cryosphere.model import utils

    ct.DDP = cpu_ddp
    shipped_monitor = utils.monitor_training
    stamps: list[float] = [time.perf_counter()]

    def monitor(*args, **kw):  # the shipped one saves checkpoints only when its gpu_id == 0
        stamps.append(time.perf_counter())
        return shipped_monitor(*args[:-1], 0, **kw)

    utils.monitor_training = monitor
    (vae, translator, ctf, grid, gmm, opt, dataset, n_epochs, batch, settings, device, sched, base, lp_mask, mask,
     amortized, results, struct_loss, segmenter) = utils.parse_yaml(a.yaml, 0)
    ct.start_training(vae, translator, ctf, grid, gmm, opt, dataset, n_epochs, batch, settings, sched, base, lp_mask,
                      mask, amortized, results, struct_loss, segmenter, device)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "epoch_seconds.json").write_text(json.dumps(np.diff(stamps).tolist()))
    vae.eval()
    segmenter.eval()
    z, ca = [], []
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
        for idx, images, _, _, _ in loader:
            _, mean, _ = vae.sample_latent(images.flatten(start_dim=-2), idx)
            quat, trans = vae.decode(mean)
            seg = segmenter.sample_segments(len(idx))
            shift = utils.compute_translations_per_residue(trans, seg, base.coord.shape[0], len(idx), device)
            ca.append(utils.deform_structure(gmm.mus, shift, quat, seg, device).numpy())
            z.append(mean.numpy())
    np.save(a.out / "z.npy", np.concatenate(z))
    np.save(a.out / "ca_A.npy", np.concatenate(ca).astype(np.float32))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
