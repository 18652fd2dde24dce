"""Benchmark ``cryohet fit-modes`` (direct and amortised) against the generic latent methods on normal-mode motion.

Data: the bundled adenylate kinase's Cα placed in the box, its ProDy ANM modes (cutoff 15 Å), particles of
states x0 + Σ_k z_k·sqrt(N)·u_k at amplitudes drawn N(0, σ_k²) (``cryohet.simulate.modes``), noise at ``--snr``;
the true amplitudes of every particle are kept. All methods run on the same images, each in its own process
(``run_method``), with the same thread count. Reported per method:

* accuracy: for fit-modes the correlation per mode of the fitted with the true amplitudes; for every method
  (fit-modes too) the cross-validated canonical correlations of its latents with the true amplitudes and the
  kNN-regression R² of the amplitudes from the latents (``cryohet.validation.metrics``) — there is no HEMNMA on
  PyPI, so the peers are ``principal-volumes`` and ``train-vae``, whose latents are not amplitudes but should
  determine them;
* time: wall seconds of the whole run and per 10^4 images (the run's wall time scaled), and the ratio to the
  direct fit;
* memory: peak resident memory of the run's process (ru_maxrss).

    .venv/bin/python bench/bench_fit_modes.py --out /tmp/bench_fit_modes                      # docs/benchmarks.md
    .venv/bin/python bench/bench_fit_modes.py --out /tmp/bfm --n 10000 --device cuda --box 64 # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent.parent

_RUN = textwrap.dedent("""
    import json, resource, sys, time
    from cryohet.methods import get_method
    from cryohet.runner import run_method
    t0 = time.perf_counter()
    run_method(get_method(sys.argv[1]), {"overwrite": True, **json.loads(sys.argv[2])}, sys.argv[3])
    print(json.dumps({"wall_s": time.perf_counter() - t0,
                      "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def make_data(a: argparse.Namespace, out: Path) -> tuple[Path, Path, np.ndarray]:
    from cryohet.io.atomic_model import read_atoms
    from cryohet.io.normal_modes import write_normal_modes
    from cryohet.models.elastic_network import anm_modes
    from cryohet.simulate import simulate_particles
    from cryohet.simulate.modes import draw_amplitudes, mode_conformations, place_in_box
    from cryohet.simulate.molecules import DEFAULT_MOLECULE

    torch.set_num_threads(a.threads)
    apix = a.extent_A / a.box
    atoms = place_in_box(read_atoms(DEFAULT_MOLECULE, "ca"), a.box, apix)
    nm = anm_modes(atoms, 6, selection="ca")
    modes = nm.modes
    write_normal_modes(out / "modes.npz", nm)
    sigma = np.array(a.sigma_A[:a.k])
    amp = draw_amplitudes(a.states, sigma, np.random.default_rng(a.seed))
    conf = mode_conformations(atoms, modes[:a.k], amp, a.box, apix, a.resolution_A, device=a.device_sim)
    sim = simulate_particles(conf, out / "data", a.n, a.snr, seed=a.seed, write_maps=False, device=a.device_sim)
    return sim.particles_star, out / "modes.npz", np.load(sim.ground_truth)["tau"]


def run(method: str, values: dict, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CRYOHET_NO_PROGRESS="1",
               PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _RUN, method, json.dumps(values), str(out)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--states", type=int, default=400, help="distinct amplitude draws (maps) among the particles")
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--extent_A", type=float, default=96.0, help="box side, Å")
    ap.add_argument("--resolution_A", type=float, default=8.0)
    ap.add_argument("--snr", type=float, default=0.3)
    ap.add_argument("--k", type=int, default=3, help="modes moved and fitted")
    ap.add_argument("--sigma_A", type=float, nargs="+", default=[3.0, 2.0, 2.0], help="amplitude spread per mode")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--vae_epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--device_sim", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out (direct amortised pv vae)")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from cryohet.validation.metrics import cca_correlations, knn_regression_r2

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    star, modes, truth = make_data(a, a.out)
    print(f"data: {a.n} particles, box {a.box}, SNR {a.snr}, {a.k} modes ({time.perf_counter() - t0:.0f} s)")
    common = dict(particles=str(star), threads=a.threads, device=a.device, seed=a.seed)
    used = f"1-{a.k}"
    runs = {
        "direct": ("fit-modes", dict(modes=str(modes), modes_used=used, fit="direct", iterations=a.iterations,
                                     resolution_A=a.resolution_A, batch_size=64), "amplitudes.npy"),
        "amortised": ("fit-modes", dict(modes=str(modes), modes_used=used, fit="amortised", epochs=a.epochs,
                                        resolution_A=a.resolution_A), "amplitudes.npy"),
        "pv": ("principal-volumes", dict(n_components=a.k, resolution_A=a.resolution_A), "latents.npy"),
        "vae": ("train-vae", dict(zdim=a.k, epochs=a.vae_epochs, batch_size=32, lr=1e-3, enc_dim=256, dec_dim=256),
                "z.npy"),
    }
    rows = {}
    for name, (method, values, latents) in runs.items():
        if name in a.skip:
            continue
        out = a.out / name
        r = run(method, {**common, **values}, out, a.threads)
        z = np.load(out / latents).astype(np.float64)
        r.update(per_1e4_s=r["wall_s"] * 1e4 / a.n, cca=cca_correlations(z, truth, a.k).tolist(),
                 knn_r2=knn_regression_r2(z, truth))
        if method == "fit-modes":
            r["corr_per_mode"] = [float(np.corrcoef(z[:, j], truth[:, j])[0, 1]) for j in range(a.k)]
            r["rmse_A"] = np.sqrt(((z - truth) ** 2).mean(0)).tolist()
        rows[name] = r
        print(name, json.dumps(r))
    base = rows.get("direct", {}).get("wall_s")
    print("\n| method | corr. per mode | CCA with truth | kNN R² | wall s | s per 10^4 images | vs direct | "
          "peak RSS MB |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cpm = " / ".join(f"{c:.3f}" for c in r.get("corr_per_mode", [])) or "—"
        cca = " / ".join(f"{c:.3f}" for c in r["cca"])
        ratio = f"{r['wall_s'] / base:.2f}" if base else "—"
        print(f"| {name} | {cpm} | {cca} | {r['knn_r2']:.3f} | {r['wall_s']:.1f} | {r['per_1e4_s']:.0f} | {ratio} | "
              f"{r['peak_rss_MB']:.0f} |")
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                    "results": rows}, indent=1))


if __name__ == "__main__":
    main()
