"""Epoch cost of ``cryohet train-vae`` with the prepared-image cache on and off and the background reader on and
off (#17 items 4 and 1), in one run on the same data.

Per setting the median CPU and wall seconds of epochs 2..E as the trainer records them (``config.json``'s history;
CPU seconds include the reader thread's), the first epoch's CPU seconds (where the cache is filled), and the
ratios to the baseline (cache off, reader on: what train-vae did before the cache). Two data sets: box 64 images
trained at box 64, and box 128 images Fourier-cropped to 64 (``--crop_box 64``: the preparation then costs more
per image than the model's pixels).

A second table isolates the loader: the CPU seconds per 1000 images of one pass of the trainer's stream (read,
prepare, CTF, the VAE's inputs; no training, no background thread) on the same data, without the cache and with it
(first pass: filling it; second: served from it).

    .venv/bin/python bench/bench_prepared_cache.py --out /tmp/bench_prepared_cache
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_trainer_scale import cryohet  # noqa: E402

SETTINGS = (("cache off, reader on (before)", "off", 4), ("cache memory, reader on", "memory", 4),
            ("cache disk, reader on", "disk", 4), ("cache off, reader off", "off", 0),
            ("cache memory, reader off", "memory", 0))


def simulate(out: Path, box: int, apix: float, n: int) -> Path:
    star = out / f"sim{box}" / "particles.star"
    if not star.exists():
        cryohet(ROOT, ["simulate", "--o", str(star.parent), "--box", str(box), "--apix", str(apix), "--resolution_A",
                       str(3 * apix), "--n_particles", str(n), "--snr", "1", "--n_states", "10", "--threads", "1",
                       "--seed", "3"], out, out / f"simulate{box}.log")
    return star


def epochs(star: Path, out: Path, crop: int, cache: str, prefetch: int, a: argparse.Namespace) -> list[dict]:
    cryohet(ROOT, ["train-vae", "--particles", str(star), "--o", str(out), "--overwrite", "yes", "--epochs",
                   str(a.epochs), "--batch_size", str(a.batch), "--enc_dim", str(a.dim), "--dec_dim", str(a.dim),
                   "--crop_box", str(crop), "--cache", cache, "--prefetch", str(prefetch), "--threads", "1"],
            out.parent, out.parent / f"{out.name}.log")
    return json.loads((out / "config.json").read_text())["history"]


def loader_pass_cpu_s(star: Path, crop: int, cache: str, out: Path, passes: int = 2) -> list[float]:
    """CPU seconds of ``passes`` passes of train-vae's stream over ``star`` (batch 64) with ``cache``."""
    import logging

    import numpy as np
    import torch

    from cryohet.data.image_cache import CachedPreparer, open_cache
    from cryohet.data.loader import BatchStream
    from cryohet.data.prepare import ImagePreparer
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.amortised import loss_inputs
    from cryohet.io.particles import load_particles

    torch.set_num_threads(1)
    pset = load_particles(str(star))
    lattice = Lattice(pset.box, pset.apix).cropped(crop or pset.box)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(lattice.box / 2), 0.85)
    reader = pset.reader()
    c = open_cache(cache, reader, prep, out, None, logging.getLogger("bench"))
    use = prep if c is None else CachedPreparer(prep, c)
    batches = np.array_split(np.random.default_rng(0).permutation(len(pset)), len(pset) // 64)
    times = []
    for _ in range(passes):
        t0 = time.process_time()
        for _ in BatchStream(reader, batches, lambda b: loss_inputs(use(b)), prefetch=0,
                             needs_read=None if c is None else c.missing):
            pass
        times.append(1000 * (time.process_time() - t0) / len(pset))
    if c is not None:
        c.close(remove=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_prepared_cache"))
    ap.add_argument("--n", type=int, default=1000, help="particles")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=256, help="encoder and decoder width")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"{a.n} particles, {a.dim}-wide encoder and decoder, batch {a.batch}, {a.epochs} epochs, --threads 1")
    print("| data | setting | epoch 1 CPU s | epochs 2+ CPU s | epochs 2+ wall s | CPU / before | final loss |")
    print("|---|---|---|---|---|---|---|")
    for box, apix, crop in ((64, 2.0, 0), (128, 1.0, 64)):
        star = simulate(a.out, box, apix, a.n)
        base = None
        for label, cache, prefetch in SETTINGS:
            hist = epochs(star, a.out / f"b{box}_{cache}_{prefetch}", crop, cache, prefetch, a)
            cpu = statistics.median(h["cpu_seconds"] for h in hist[1:])
            wall = statistics.median(h["seconds"] for h in hist[1:])
            base = base or cpu
            data = f"box {box}" + (f" cropped to {crop}" if crop else "")
            print(f"| {data} | {label} | {hist[0]['cpu_seconds']:.2f} | {cpu:.2f} | {wall:.2f} | {cpu / base:.2f} | "
                  f"{hist[-1]['loss']:.6f} |", flush=True)
    print("\n| data | loader pass, CPU s per 1000 images | no cache | cache, 1st pass (fill) | cache, 2nd pass | "
          "2nd / no cache |\n|---|---|---|---|---|---|")
    for box, apix, crop in ((64, 2.0, 0), (128, 1.0, 64)):
        star = simulate(a.out, box, apix, a.n)
        plain = statistics.median(loader_pass_cpu_s(star, crop, "off", a.out, 3))
        for cache in ("memory", "disk"):
            fill, served = loader_pass_cpu_s(star, crop, cache, a.out)
            data = f"box {box}" + (f" cropped to {crop}" if crop else "")
            print(f"| {data} | {cache} | {plain:.3f} | {fill:.3f} | {served:.3f} | {served / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
