"""Diagnostics of ``train-vae --anchor homogeneous`` (#11 item 3): where the per-image maps lose, and the latents.

``maps RUN DATASET``: the per-image FSC AUC (CryoBench's, ``cryobench_score``; 30 images) of a train-vae run's
maps at each image's latent, of the same model at the mean latent for every image, and of a homogeneous map
(``--homogeneous map.mrc``): a gap between the first two is what the latents' spread costs.

``hinge``: |Spearman| of the latent's PC1 with the hinge angle for train-vae settings (JSON, one per row) on the
hinge of ``tests/test_vae.py`` (1000 particles, box 32, SNR 1 by default, 3 × 128, batch 32, lr 10⁻³, 5 epochs).

    .venv/bin/python bench/bench_vae_anchor.py maps /work/peers/cryobench/lb2/ribosembly/train-vae \\
        /work/peers/cryobench/ribosembly --homogeneous /work/peers/cryobench/lb2/ribosembly/reconstruct/map.mrc
    .venv/bin/python bench/bench_vae_anchor.py hinge --out /tmp/hinge '{}' '{"beta": 1}' \\
        '{"anchor": "homogeneous"}' '{"anchor": "homogeneous", "beta": 1}'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")

from cryohet.io.mrc import read_map  # noqa: E402
from cryohet.methods.simulate import METHOD as SIMULATE  # noqa: E402
from cryohet.methods.train_vae import METHOD as TRAIN_VAE  # noqa: E402
from cryohet.models.neural import load_volume  # noqa: E402
from cryohet.runner import run_method  # noqa: E402
from cryohet.validation import metrics as M  # noqa: E402
from cryohet.validation.cryobench_score import image_indices, truth_mask  # noqa: E402
from cryohet.validation.datasets import load_dataset  # noqa: E402


def maps(run: Path, dataset: Path, homogeneous: Path | None, n_images: int) -> None:
    ds = load_dataset(dataset)
    vol, z = load_volume(run / "model.safetensors"), np.load(run / "z.npy")
    idx, model, box = image_indices(ds.n_particles, n_images), ds.true_model(), ds.box
    mask = truth_mask(ds, box)

    def auc(v: np.ndarray, i: int) -> float:
        ref = M.match_box(model.map(int(ds.state[i]), keep=False), box)
        return M.cryobench_auc(M.cryobench_fsc(M.match_box(v, box), ref, mask))

    rows = {"maps at each image's latent": vol.volumes(z[idx]),
            "the model at the mean latent": np.repeat(vol.volumes(z.mean(0, keepdims=True)), len(idx), 0)}
    if homogeneous is not None:
        rows["homogeneous map"] = np.repeat(read_map(homogeneous)[0][None], len(idx), 0)
    for name, vols in rows.items():
        print(f"| {name} | {np.mean([auc(v, i) for v, i in zip(vols, idx, strict=True)]):.4f} |")


def hinge(out: Path, snr: float, configs: list[str]) -> None:
    from cryohet.validation.metrics import spearman_pc1

    data = out / f"hinge_snr{snr:g}"
    if not (data / "particles.star").exists():
        run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=1000, snr=snr, n_states=20,
                                  threads=1, seed=3), data)
    tau = np.load(data / "ground_truth.npz")["tau"]
    for cfg in configs:
        run = out / "run"
        run_method(TRAIN_VAE, dict(particles=str(data / "particles.star"), epochs=5, enc_dim=128, dec_dim=128,
                                   batch_size=32, lr=1e-3, threads=1, overwrite=True, **json.loads(cfg)), run)
        kl = [round(h["kld"], 2) for h in json.loads((run / "config.json").read_text())["history"]]
        print(f"| {cfg} | {spearman_pc1(np.load(run / 'z.npy'), tau):.3f} | {kl} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("maps")
    m.add_argument("run", type=Path)
    m.add_argument("dataset", type=Path)
    m.add_argument("--homogeneous", type=Path, default=None)
    m.add_argument("--n_images", type=int, default=30)
    h = sub.add_parser("hinge")
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--snr", type=float, default=1.0)
    h.add_argument("configs", nargs="+", help="train-vae parameters per row, JSON")
    a = ap.parse_args()
    if a.cmd == "maps":
        maps(a.run, a.dataset, a.homogeneous, a.n_images)
    else:
        hinge(a.out, a.snr, a.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
