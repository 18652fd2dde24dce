"""train-deform (--field zernike and flow) beside train-vae on one simulated hinge: |Spearman| of the latent's PC1
with the true τ, per-image FSC AUC against the true states (the maps at 3 particles' latents for every other state)
next to the consensus map's, seconds per epoch and their ratio to train-vae's.

    .venv/bin/python bench/bench_train_deform.py --out /tmp/bench_train_deform --box 64 --apix 2 --resolution_A 6 \\
        --n 1000 --snr 0.3 --epochs 8

(bench/bench_deform.py runs every deformation model of issue #12 side by side through benchmark-score.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_atomic import epoch_seconds  # noqa: E402

from cryohet.analysis.latent import pca  # noqa: E402
from cryohet.cli import main  # noqa: E402
from cryohet.io.mrc import read_map  # noqa: E402
from cryohet.models.base import load_volume_model  # noqa: E402
from cryohet.validation.metrics import volume_fsc  # noqa: E402


def per_image_auc(run: Path, sim: Path, consensus: Path, state: np.ndarray) -> tuple[float, float]:
    """(mean FSC AUC of the run's maps at 3 particles' latents per state, the consensus map's), every other state."""
    rng = np.random.default_rng(0)
    model, z = load_volume_model(run), np.load(run / "z.npy")
    cons, apix = read_map(consensus)
    ours, base = [], []
    for s in range(0, int(state.max()) + 1, 2):
        truth = read_map(sim / "maps" / f"state_{s:03d}.mrc")[0]
        rows = np.flatnonzero(state == s)
        idx = rng.choice(rows, min(3, len(rows)), replace=False)
        ours += [volume_fsc(v, truth, apix)["auc"] for v in model.volumes(z[idx])]
        base.append(volume_fsc(cons, truth, apix)["auc"])
    return float(np.mean(ours)), float(np.mean(base))


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_train_deform"))
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--resolution_A", type=float, default=6.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--snr", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    common = ["--threads", str(a.threads), "--device", "cpu", "--overwrite", "yes"]
    sim, rec = a.out / "sim", a.out / "rec"
    assert main(["simulate", "--o", str(sim), "--motion", "hinge", "--box", str(a.box), "--apix", str(a.apix),
                 "--resolution_A", str(a.resolution_A), "--n_particles", str(a.n), "--snr", str(a.snr), *common]) == 0
    assert main(["reconstruct", "--o", str(rec), "--particles", str(sim / "particles.star"), *common]) == 0
    gt = np.load(sim / "ground_truth.npz")
    train = ["--particles", str(sim / "particles.star"), "--zdim", "2", "--epochs", str(a.epochs), *common]
    runs = {"train-vae": ["train-vae", "--batch_size", "32", "--lr", "1e-3"]}
    for field in ("zernike", "flow"):
        runs[f"train-deform {field}"] = ["train-deform", "--field", field, "--consensus_map", str(rec / "map.mrc"),
                                         "--resolution_A", str(a.resolution_A), "--n_clusters", "0"]
    rows = {}
    for label, args in runs.items():
        out = a.out / label.replace(" ", "_")
        assert main([args[0], "--o", str(out), *args[1:], *train]) == 0
        z = np.load(out / "z.npy").astype(np.float64)
        rho = abs(spearmanr(pca(z, 1).transform(z)[:, 0], gt["tau"][:, 0])[0])
        ours, base = per_image_auc(out, sim, rec / "map.mrc", gt["state"])
        rows[label] = (rho, ours, base, epoch_seconds(out))
    vae = rows["train-vae"][3]
    print(f"hinge, box {a.box}, {a.apix:g} Å/px, {a.n} particles, SNR {a.snr:g}, {a.epochs} epochs")
    print("| method | Spearman ρ (abs) of PC1 | per-image FSC AUC | consensus map's | s / epoch | time / train-vae |")
    print("|---|---|---|---|---|---|")
    for label, (rho, ours, base, sec) in rows.items():
        print(f"| {label} | {rho:.3f} | {ours:.3f} | {base:.3f} | {sec:.1f} | {sec / vae:.2f} |")


if __name__ == "__main__":
    main_bench()
