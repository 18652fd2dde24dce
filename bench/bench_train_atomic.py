"""train-atomic (atomic decoder, CryoSTAR class) side by side with train-vae (cryoDRGN-style neural volume) and
fit-modes --fit amortised (DeepHEMNMA class, ANM modes 1-3 of the same reference) on the same simulated images.

    .venv/bin/python bench/bench_train_atomic.py [--n 2000] [--snr 1 0.3] [--epochs 20] [--device cpu]

Data: the LID hinge of the bundled adenylate kinase (20 states, 0-50°, Cα RMSD to the open state up to 5.9 Å),
box 32 at 3 Å/px, images at each --snr; the open state's heavy atoms in the map frame are the reference model (and
the nodes of ``cryohet nma --selection ca`` for fit-modes). Scores: the latent against the true τ (|Spearman| of its
first principal component, cross-validated kNN R²), the per-particle Cα RMSD of the models decoded at each
particle's latent to its true state (ours and fit-modes'; train-vae gives maps, not models) with the reference's
RMSD as the baseline, and the seconds per epoch (ratios to ours). CryoSTAR itself is not installable here (it is
not on this machine's package index), hence fit-modes and train-vae as the peers. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.analysis.latent import pca  # noqa: E402
from cryohet.cli import main as cli  # noqa: E402
from cryohet.inference.trainer import load_checkpoint  # noqa: E402
from cryohet.io.atomic_model import write_models  # noqa: E402
from cryohet.models.atomic_decoder import AtomicDecoder  # noqa: E402
from cryohet.models.modes import ModeModel  # noqa: E402
from cryohet.simulate import simulate_particles  # noqa: E402
from cryohet.simulate.atomic_truth import hinge_truth  # noqa: E402
from cryohet.validation.metrics import knn_regression_r2  # noqa: E402

BOX, APIX, RES = 32, 3.0, 8.0


def run(args: list[str]) -> None:
    code = cli(args)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({code})")


def rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


def latent_scores(z: np.ndarray, tau: np.ndarray) -> tuple[float, float]:
    z = np.asarray(z, np.float64)
    return abs(spearmanr(pca(z, 1).transform(z)[:, 0], tau)[0]), knn_regression_r2(z, tau)


def num(v: float, digits: int = 3) -> str:
    return "—" if not np.isfinite(v) else f"{v:.{digits}f}"


def epoch_seconds(run_dir: Path) -> float:
    return float(np.mean([h["seconds"] for h in load_checkpoint(run_dir / "checkpoint.safetensors").history]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--zdim", type=int, default=2, help="latent dimension of train-atomic and train-vae")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="", help="folder for the data and runs (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_train_atomic_"))
    common = ["--threads", str(a.threads), "--device", a.device, "--overwrite", "yes"]
    truth = hinge_truth(20, 50.0, BOX, APIX, RES)
    ref = work / "ref.pdb"
    work.mkdir(parents=True, exist_ok=True)
    write_models(ref, truth.heavy, truth.heavy.xyz_A[None])
    run(["nma", "--model", str(ref), "--selection", "ca", "--n_modes", "6", "--movie_modes", "0", "--o",
         str(work / "nma"), *common])
    rows = []
    for snr in a.snr:
        d = work / f"snr_{snr:g}"
        sim = simulate_particles(truth.conf, d / "data", a.n, snr, seed=0, write_maps=False)
        gt = np.load(sim.ground_truth)
        tau, true = gt["tau"][:, 0], truth.ca_frames_A[gt["state"]]
        far = tau >= 0.5
        star = str(sim.particles_star)
        ep = ["--epochs", str(a.epochs)]
        run(["train-atomic", "--particles", star, "--model", str(ref), "--zdim", str(a.zdim), *ep,
             "--o", str(d / "atomic"), *common])
        run(["train-vae", "--particles", star, "--zdim", str(a.zdim), *ep, "--batch_size", "32", "--lr", "1e-3",
             "--res_limit_A", str(RES), "--o", str(d / "vae"), *common])
        run(["fit-modes", "--particles", star, "--modes", str(work / "nma"), "--modes_used", "1-3", "--fit",
             "amortised", "--resolution_A", str(RES), *ep, "--o", str(d / "modes"), *common])
        z_at = np.load(d / "atomic" / "z.npy")
        z_vae = np.load(d / "vae" / "z.npy")
        z_nm = np.load(d / "modes" / "amplitudes.npy")
        r_at = rmsd(AtomicDecoder.load(d / "atomic" / "model.safetensors").frames_A(z_at), true)
        r_nm = rmsd(ModeModel.load(d / "modes" / "model.safetensors").frames_A(z_nm), true)
        r_ref = rmsd(truth.ca_frames_A[0][None], true)
        t_at = epoch_seconds(d / "atomic")
        geo = json.loads((d / "atomic" / "atomic_fit.json").read_text())["geometry"]["pc1"]
        for name, z, r, t in (("train-atomic", z_at, r_at, t_at), ("train-vae", z_vae, None, epoch_seconds(d / "vae")),
                              ("fit-modes amortised", z_nm, r_nm, epoch_seconds(d / "modes"))):
            rho, r2 = latent_scores(z, tau)
            rows.append((snr, name, rho, r2, r, far, t, t / t_at))
        rows.append((snr, "reference model", np.nan, np.nan, r_ref, far, np.nan, np.nan))
        print(f"SNR {snr:g}: train-atomic's models along PC1: Cα-Cα {geo['bond_mean_A']:.2f} ± "
              f"{geo['bond_std_A']:.2f} Å, {100 * geo['bonds_outside_3.8+-0.3_A']:.1f} % outside 3.8 ± 0.3 Å, "
              f"{geo['clashes_per_model']:.1f} clashes < 3 Å per model", flush=True)
    print(f"\n{a.n} particles, box {BOX}, {a.epochs} epochs, device {a.device}, {a.threads} thread(s); Cα RMSD per "
          "particle to its true state, mean over all particles / over the far states (τ ≥ 0.5)\n")
    print("| SNR | method | Spearman ρ (abs) of PC1 | kNN R² | Cα RMSD all (Å) | Cα RMSD far (Å) | s / epoch | "
          "time / train-atomic |")
    print("|---|---|---|---|---|---|---|---|")
    for snr, name, rho, r2, r, far, t, ratio in rows:
        ra = "—" if r is None else f"{r.mean():.2f}"
        rf = "—" if r is None else f"{r[far].mean():.2f}"
        print(f"| {snr:g} | {name} | {num(rho)} | {num(r2)} | {ra} | {rf} | {num(t, 2)} | {num(ratio, 2)} |")


if __name__ == "__main__":
    main()
