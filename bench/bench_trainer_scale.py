"""The trainer's per-epoch cost and the commands' fixed costs (#17 items 1 and 6), an earlier revision beside this
tree in one run.

The earlier revision (``--before``, a git revision of this repository) is exported with ``git archive`` and run
from its own folder with the same interpreter, data and settings; each row prints both and their ratio.

* per epoch: ``cryohet train-vae`` on one simulated set (box 32), the median over epochs 2..E of the CPU and wall
  seconds the trainer records per epoch (``config.json``'s history), at batch 8 (many small steps, where the work
  around each step shows) and batch 64;
* fixed costs: wall and CPU seconds of ``cryohet --help``, and of a whole ``train-vae`` run less its epochs
  (imports, set-up, the final latents and the outputs: a 1-epoch run less the median epoch of a 3-epoch one); CPU
  seconds (user + system, ``os.wait4``) are robust to other load on the machine, wall seconds are not.

    .venv/bin/python bench/bench_trainer_scale.py --before c11f23e --after gpuscale --out /tmp/bench_trainer_scale
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from command_cost import Cost, timed  # noqa: E402


def export(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` in ``dest`` (git archive)."""
    if not (dest / "cryohet").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def cryohet(tree: Path, args: list[str], out: Path, log: Path) -> Cost:
    """Wall and CPU seconds of ``cryohet <args>`` run from ``tree``."""
    os.environ.update(PYTHONPATH=str(tree), CRYOHET_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "import sys; from cryohet.cli import main; sys.exit(main())", *args]
    return timed(cmd, out, log)


def train(tree: Path, star: Path, out: Path, batch: int, epochs: int, dim: int) -> tuple[Cost, list[dict]]:
    """(cost, history) of one train-vae run."""
    cost = cryohet(tree, ["train-vae", "--particles", str(star), "--o", str(out), "--overwrite", "yes",
                          "--epochs", str(epochs), "--batch_size", str(batch), "--enc_dim", str(dim), "--dec_dim",
                          str(dim), "--lr", "1e-3", "--threads", "1"], out.parent, out.parent / f"{out.name}.log")
    return cost, json.loads((out / "config.json").read_text())["history"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare with (e.g. the branch's base)")
    ap.add_argument("--after", default="", help="git revision to measure (default: this working tree)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_trainer_scale"))
    ap.add_argument("--n", type=int, default=1000, help="particles")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256, help="encoder and decoder width")
    ap.add_argument("--help_repeat", type=int, default=5)
    ap.add_argument("--parts", nargs="+", default=["epochs", "fixed"], choices=("epochs", "fixed"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    trees = {"before": export(a.before, a.out / "before"),
             "now": export(a.after, a.out / "after") if a.after else ROOT}
    sim = a.out / "sim"
    if not (sim / "particles.star").exists():
        cryohet(ROOT, ["simulate", "--o", str(sim), "--box", "32", "--apix", "4", "--resolution_A", "10",
                       "--n_particles", str(a.n), "--snr", "1", "--n_states", "20", "--threads", "1", "--seed", "3"],
                a.out, a.out / "simulate.log")
    rows: list[tuple[str, float, float]] = []
    for batch in (8, 64) if "epochs" in a.parts else ():
        res = {}
        for name, tree in trees.items():
            _, hist = train(tree, sim / "particles.star", a.out / f"{name}_b{batch}", batch, a.epochs, a.dim)
            res[name] = [statistics.median(h[k] for h in hist[1:]) for k in ("cpu_seconds", "seconds")]
        rows += [(f"epoch CPU s, batch {batch}", res["before"][0], res["now"][0]),
                 (f"epoch wall s, batch {batch}", res["before"][1], res["now"][1])]
    fixed = {}
    for name, tree in trees.items() if "fixed" in a.parts else ():
        helps = [cryohet(tree, ["--help"], a.out, a.out / f"{name}_help.log") for _ in range(a.help_repeat)]
        c1, _ = train(tree, sim / "particles.star", a.out / f"{name}_e1", 64, 1, a.dim)
        _, hist = train(tree, sim / "particles.star", a.out / f"{name}_e3", 64, 3, a.dim)
        fixed[name] = (statistics.median(h.wall_s for h in helps), statistics.median(h.cpu_s for h in helps),
                       c1.wall_s - statistics.median(h["seconds"] for h in hist),
                       c1.cpu_s - statistics.median(h["cpu_seconds"] for h in hist))
    labels = ("cryohet --help wall s", "cryohet --help CPU s", "train-vae fixed wall s (1-epoch run less an epoch)",
              "train-vae fixed CPU s (1-epoch run less an epoch)")
    rows += [(label, fixed["before"][i], fixed["now"][i]) for i, label in enumerate(labels) if fixed]
    print(f"{a.n} particles, box 32, {a.dim}-wide encoder and decoder, {a.epochs} epochs; before = {a.before}, "
          f"now = {a.after or 'this tree'}")
    print("| measure | before | now | now / before |\n|---|---|---|---|")
    for label, b, n in rows:
        print(f"| {label} | {b:.2f} | {n:.2f} | {n / b:.2f} |")


if __name__ == "__main__":
    main()
