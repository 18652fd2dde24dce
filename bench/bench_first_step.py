"""Seconds from the command to train-vae's first training step on a large particle set (#17 item 4).

Runs ``cryohet train-vae`` with each setting of ``--settings`` (JSON objects of extra parameters) on ``--star``,
reads its log as it is written and stops the run when the trainer announces its first step ("amortised
inference: ..."). Reports the wall seconds to that line and the CPU seconds the process used until then
(``/proc/<pid>/stat``), and the wall seconds of each logged stage before it. The particle set of
docs/benchmarks.md ("Scale on a CPU"): 10⁶ noise images of box 16 in 10 stacks.

    python bench/bench_first_step.py --star /work/peers/m1e6/p.star --out /tmp/first_step \\
        --settings '{}' '{"anchor_particles": 0}' '{"anchor": "none"}'
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--epochs", "1", "--zdim", "2", "--enc_dim", "32", "--dec_dim", "32", "--batch_size", "256",
          "--threads", "1"]
FIRST_STEP = "amortised inference:"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def first_step(star: Path, out: Path, extra: dict[str, object]) -> dict[str, object]:
    args = [sys.executable, "-c", "import sys; from cryohet.cli import main; sys.exit(main())", "train-vae",
            "--particles", str(star), "--o", str(out), "--overwrite", *COMMON]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CRYOHET_NO_PROGRESS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stages = []
    try:
        for line in proc.stdout:
            stages.append((round(time.monotonic() - t0, 1), line.strip()[20:110]))
            if FIRST_STEP in line:
                return {"settings": extra, "wall_s": stages[-1][0], "cpu_s": round(cpu_seconds(proc.pid), 1),
                        "stages": stages}
        raise RuntimeError("train-vae ended before its first step:\n" + "\n".join(s for _, s in stages[-20:]))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--star", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of extra train-vae parameters")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [first_step(a.star, a.out / f"run{i}", json.loads(s)) for i, s in enumerate(a.settings)]
    (a.out / "first_step.json").write_text(json.dumps(rows, indent=1))
    print("| settings | wall s to the first step | CPU s |\n|---|---|---|")
    for r in rows:
        print(f"| `{json.dumps(r['settings'])}` | {r['wall_s']} | {r['cpu_s']} |")
        for t, s in r["stages"]:
            print(f"  {t:7.1f}  {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
