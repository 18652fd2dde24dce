"""train-gmm (Gaussian mixture of the consensus map, DynaMight / e2gmm class) side by side with train-vae
(cryoDRGN-style neural volume) and principal-volumes (linear) on the same simulated images.

    .venv/bin/python bench/bench_gmm.py [--n 2000] [--motion hinge two_part] [--snr 1] [--epochs 20]

Data: the bundled adenylate kinase's LID hinge (1-D τ) and its LID and NMP moving independently (two_part, 2-D τ),
box 32 at 3 Å/px, maps at 8 Å; the consensus map is ``cryohet reconstruct``'s of the same particles. Scores: the
latent against the true τ (|Spearman| of PC1 with τ₁, cross-validated kNN R² over τ's coordinates), the per-image
FSC AUC of the map at each sampled particle's latent against its true state's map (4 particles per state; the
consensus map's against the same maps as the baseline), train-gmm's half-set deformation error on the static core
and on the moving parts (Gaussians whose nearest Cα moves < 1 Å / > 5 Å between the extreme states), and the
seconds per epoch (ratio to train-gmm; train-gmm's epoch counts its model of all particles; its two half models
take as long again). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from bench_train_atomic import epoch_seconds, num, run  # noqa: E402  (this folder: the same helpers)

from cryohet.analysis.latent import pca  # noqa: E402
from cryohet.io.atomic_model import box_centre_A, read_atoms  # noqa: E402
from cryohet.io.mrc import read_map  # noqa: E402
from cryohet.models.base import load_volume_model  # noqa: E402
from cryohet.reconstruct.fsc import fsc, fsc_auc  # noqa: E402
from cryohet.simulate.molecules import DEFAULT_MOLECULE, centre_of_mass  # noqa: E402
from cryohet.simulate.motions import default_hinges  # noqa: E402
from cryohet.validation.metrics import knn_regression_r2  # noqa: E402

BOX, APIX, RES = 32, 3.0, 8.0


def true_ca(motion: str) -> np.ndarray:
    """Cα positions (S, N, 3) of ``cryohet simulate``'s states (20 states, 50°) in the map frame, centred as
    ``simulate.motions`` centres the maps (the mean of the states' centres of mass at the box centre)."""
    heavy = read_atoms(DEFAULT_MOLECULE, "heavy")
    lid, nmp = default_hinges()["LID"][0], default_hinges()["NMP"][0]
    if motion == "hinge":
        models = np.stack([lid.apply(heavy.xyz_A, 50.0 * t) for t in np.linspace(0, 1, 20)])
    else:
        grid = np.linspace(0, 1, 5)
        models = np.stack([nmp.apply(lid.apply(heavy.xyz_A, 50.0 * t1), 50.0 * t2) for t1, t2
                           in itertools.product(grid, grid)])
    centre = np.mean([centre_of_mass(x, heavy.weight) for x in models], axis=0)
    models += box_centre_A(BOX, APIX) - centre
    return models[:, heavy.name == "CA"]


def per_image_auc(run_dir: Path, z: np.ndarray, rows: np.ndarray, state: np.ndarray, maps: Path) -> float:
    model = load_volume_model(run_dir)
    aucs = [fsc_auc(fsc(v, read_map(maps / f"state_{s:03d}.mrc")[0]))
            for v, s in zip(model.volumes(z[rows]), state[rows], strict=True)]
    return float(np.mean(aucs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--motion", nargs="+", default=["hinge", "two_part"], choices=("hinge", "two_part"))
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--zdim", type=int, default=4, help="latent dimension of train-gmm and train-vae; "
                    "principal-volumes uses as many components")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="", help="folder for the data and runs (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_gmm_"))
    common = ["--threads", str(a.threads), "--device", a.device, "--overwrite", "yes"]
    rows = []
    for motion in a.motion:
        d = work / motion
        run(["simulate", "--motion", motion, "--n_particles", str(a.n), "--box", str(BOX), "--apix", str(APIX),
             "--resolution_A", str(RES), "--snr", str(a.snr), "--o", str(d / "data"), *common])
        gt = np.load(d / "data" / "ground_truth.npz")
        tau, state = gt["tau"], gt["state"]
        sample = np.concatenate([np.flatnonzero(state == s)[:4] for s in np.unique(state)])
        star = str(d / "data" / "particles.star")
        run(["reconstruct", "--particles", star, "--o", str(d / "cons"), *common])
        ep = ["--epochs", str(a.epochs)]
        run(["train-gmm", "--particles", star, "--consensus_map", str(d / "cons" / "map.mrc"), "--zdim",
             str(a.zdim), *ep, "--batch_size", "16", "--resolution_A", str(RES), "--o", str(d / "gmm"), *common])
        run(["train-vae", "--particles", star, "--zdim", str(a.zdim), *ep, "--batch_size", "32", "--lr", "1e-3",
             "--res_limit_A", str(RES), "--o", str(d / "vae"), *common])
        run(["principal-volumes", "--particles", star, "--n_components", str(a.zdim), "--resolution_A", str(RES),
             "--o", str(d / "pv"), *common])
        consensus = read_map(d / "cons" / "map.mrc")[0]
        base = float(np.mean([fsc_auc(fsc(consensus, read_map(d / "data" / "maps" / f"state_{s:03d}.mrc")[0]))
                              for s in state[sample]]))
        t_gmm = epoch_seconds(d / "gmm")
        for name, folder, zfile in (("train-gmm", "gmm", "z.npy"), ("train-vae", "vae", "z.npy"),
                                    ("principal-volumes", "pv", "latents.npy")):
            z = np.load(d / folder / zfile).astype(np.float64)
            rho = abs(spearmanr(pca(z, 1).transform(z)[:, 0], tau[:, 0])[0])
            t = epoch_seconds(d / folder) if folder != "pv" else np.nan
            rows.append((motion, name, rho, knn_regression_r2(z, tau), per_image_auc(d / folder, z, sample, state,
                                                                                     d / "data" / "maps"),
                         t, t / t_gmm))
        rows.append((motion, "consensus map", np.nan, np.nan, base, np.nan, np.nan))
        ca = true_ca(motion)
        model = load_volume_model(d / "gmm")
        _, near = cKDTree(ca[len(ca) // 2]).query(model.atoms.xyz_A)
        motion_A = np.linalg.norm(ca[-1] - ca[0], axis=1)[near]
        g_err = np.load(d / "gmm" / "gaussian_error.npy")
        report = json.loads((d / "gmm" / "gmm_fit.json").read_text())
        print(f"{motion}: {len(model.atoms)} Gaussians, consensus fit correlation "
              f"{report['consensus_fit']['correlation']:.4f}; half-set error per Gaussian, median: static core "
              f"{np.median(g_err[motion_A < 1]):.2f} Å, moving (> 5 Å) {np.median(g_err[motion_A > 5]):.2f} Å; "
              f"per particle median {report['halfsets']['error_A']['median']:.2f} Å; KL at the last epoch "
              f"{report.get('latent_kl')}", flush=True)
    print(f"\n{a.n} particles, SNR {a.snr:g}, box {BOX}, {a.epochs} epochs, zdim {a.zdim}, device {a.device}, "
          f"{a.threads} thread(s)\n")
    print("| motion | method | Spearman ρ (abs) PC1 vs τ₁ | kNN R² | per-image FSC AUC | s / epoch | "
          "time / train-gmm |")
    print("|---|---|---|---|---|---|---|")
    for motion, name, rho, r2, auc, t, ratio in rows:
        print(f"| {motion} | {name} | {num(rho)} | {num(r2)} | {num(auc)} | {num(t, 2)} | {num(ratio, 2)} |")


if __name__ == "__main__":
    main()
