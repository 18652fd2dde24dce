"""Reconstruction side by side with relion_reconstruct: time ratio and FSC to the true map, in one run.

    .venv/bin/python bench/bench_reconstruct.py --n 10000 --box 64 --out /tmp/bench_rec

relion_project makes the images (hand-vol.mrc from the cryoDRGN test data, noise, CTF, origins); both programs
reconstruct the same STAR; the wall times (median of --repeat runs each) and the FSC of each map against the
truth, and the peak resident memory of each program, are printed as a Markdown row for docs/benchmarks.md.
``--box`` above 64 Fourier-pads the map (the same molecule on a finer grid).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from relion_tools import THIRDPARTY, pose_ctf_star, relion  # noqa: E402

from cryohet.geometry.fourier import fourier_crop_3d  # noqa: E402
from cryohet.inference.ppca import fourier_pad_3d  # noqa: E402
from cryohet.io.mrc import read_map, write_map  # noqa: E402
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident memory in GB) of one command."""
    t0 = time.perf_counter()
    with open(cwd / "bench_stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {(cwd / 'bench_stderr.txt').read_text()[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="number of particles")
    ap.add_argument("--box", type=int, default=64, help="box in pixels (hand-vol.mrc is Fourier-cropped to it)")
    ap.add_argument("--apix", type=float, default=2.0, help="pixel size in Å at box 64")
    ap.add_argument("--noise", type=float, default=2.0, help="relion_project --white_noise (std)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for cryohet (relion_reconstruct: 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_reconstruct"))
    args = ap.parse_args()
    d = args.out
    d.mkdir(parents=True, exist_ok=True)
    vol, _ = read_map(THIRDPARTY / "hand-vol.mrc")
    apix = args.apix * vol.shape[0] / args.box
    vol = torch.from_numpy(np.array(vol))
    vol = (fourier_crop_3d(vol, args.box) if args.box <= len(vol) else fourier_pad_3d(vol, args.box)).numpy()
    write_map(d / "truth.mrc", vol, apix)
    pose_ctf_star(d / "ang.star", args.n, args.box, apix, seed=1)
    relion("relion_project", "--i", "truth.mrc", "--o", "sim", "--ang", "ang.star", "--ctf", "--angpix", str(apix),
           "--add_noise", "--white_noise", str(args.noise), cwd=d)
    env = dict(os.environ, CRYOHET_NO_PROGRESS="1")
    cryohet = [sys.executable, "-m", "cryohet.cli", "reconstruct", "--particles", "sim.star",
               "--threads", str(args.threads), "--overwrite", "yes"]  # repeats replace the earlier run
    t_rel, t_ours, t_none = [], [], []
    for _ in range(args.repeat):
        t_rel.append(timed(["relion_reconstruct", "--i", "sim.star", "--o", "relion.mrc", "--ctf",
                            "--angpix", str(apix)], d))
        t_ours.append(timed([*cryohet, "--o", "ours"], d, env))
        t_none.append(timed([*cryohet, "--o", "ours_none", "--wiener", "none"], d, env))
    truth = read_map(d / "truth.mrc")[0]
    maps = {name: read_map(d / path)[0] for name, path in
            (("relion", "relion.mrc"), ("cryohet", "ours/map.mrc"), ("cryohet_none", "ours_none/map.mrc"))}
    half = fsc(read_map(d / "ours/half1.mrc")[0], read_map(d / "ours/half2.mrc")[0])
    tr, to, tn = (statistics.median(t for t, _ in runs) for runs in (t_rel, t_ours, t_none))
    mr, mo = (max(m for _, m in runs) for runs in (t_rel, t_ours))
    agree = fsc(maps["cryohet_none"], maps["relion"])  # both plain division: where data are noise, they agree
    print(f"| {args.n} | {args.box} | {apix:.2f} | {tr:.1f} | {to:.1f} ({to / tr:.2f}×) | {tn:.1f} ({tn / tr:.2f}×) "
          f"| {fsc_auc(fsc(maps['relion'], truth)):.3f} | {fsc_auc(fsc(maps['cryohet'], truth)):.3f} "
          f"| {agree[: int(0.75 * args.box // 2) + 1].min():.3f} | {resolution_at(half, args.box, apix):.2f} "
          f"| {mr:.2f} | {mo:.2f} ({mo / mr:.2f}×) |")


if __name__ == "__main__":
    main()
