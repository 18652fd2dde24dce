"""Benchmark the splatting projector (``geometry.splat``) against the analytic slices (``geometry.gaussian_slices``).

Random Gaussian atoms (N of them, σ 12 Å about the centre, weights 0.5-1.5), B random RELION rotations, the
half-plane pixels inside the resolution circle (``Lattice.half_plane``: M of them); both projectors on the same
inputs in one process, forward alone and forward + backward (gradients in positions and weights). Reported:
median wall time of ``--repeat`` runs of each and their ratio; accuracy of the splatted slices per shell below
the resolution (lowest correlation with the analytic ones, largest amplitude deviation), and the correlation of
the position gradients.

    .venv/bin/python bench/bench_splat.py                    # docs/benchmarks.md (CPU, --threads 2)
    .venv/bin/python bench/bench_splat.py --device cuda      # on a GPU
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.gaussian_slices import gaussian_slices
from cryohet.geometry.gaussians import SIGMA_PER_RESOLUTION
from cryohet.geometry.lattice import Lattice
from cryohet.geometry.splat import splat_slices


def timed(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def case(n_atoms: int, box: int, apix: float, res_A: float, batch: int, oversample: int, repeat: int,
         device: torch.device, max_bytes: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    A = torch.as_tensor(euler_to_matrix(random_euler(batch, rng)), dtype=torch.float32, device=device)
    xyz = torch.as_tensor(rng.normal(0, 12, (n_atoms, 3)), dtype=torch.float32, device=device)
    w = torch.as_tensor(rng.uniform(0.5, 1.5, n_atoms), dtype=torch.float32, device=device)
    pts = Lattice(box, apix).half_plane(box * apix / res_A)
    kxy = pts.kxy.to(device)
    sigma = SIGMA_PER_RESOLUTION * res_A
    kw = dict(box=box, lowpass_A=res_A)

    def analytic(x=xyz, ww=w):
        return gaussian_slices(A, x, ww, sigma, kxy, apix, **kw)

    def splat(x=xyz, ww=w):
        return splat_slices(A, x, ww, sigma, kxy, apix, oversample=oversample, **kw)

    ref, out = analytic(), splat()
    r = torch.complex(ref[..., 0].double(), ref[..., 1].double()).cpu()
    o = torch.complex(out[..., 0].double(), out[..., 1].double()).cpu()
    corr, dev = 1.0, 0.0
    for s in range(1, int(pts.shell.max()) + 1):
        k = pts.shell == s
        num = (r[:, k].conj() * o[:, k]).real.sum()
        pr, po = r[:, k].abs().pow(2).sum(), o[:, k].abs().pow(2).sum()
        corr = min(corr, float(num / (pr * po).sqrt()))
        dev = max(dev, abs(float((po / pr).sqrt()) - 1))
    g = torch.as_tensor(rng.normal(size=ref.shape), dtype=torch.float32, device=device)
    x = xyz[None].expand(batch, -1, -1).clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)

    def backward(fn):
        x.grad = wg.grad = None
        (fn(x, wg) * g).sum().backward()
        return x.grad.clone()

    out = {"N": n_atoms, "box": box, "M": len(pts), "B": batch, "os": oversample,
           "t_analytic": timed(analytic, repeat, device), "t_splat": timed(splat, repeat, device),
           "tb_splat": timed(lambda: backward(splat), repeat, device), "corr": corr, "dev": dev}
    # the analytic backward keeps cos and sin of every (image, pixel, atom) phase: skipped beyond max_bytes
    if 8 * batch * len(pts) * n_atoms <= max_bytes:
        ga, gs = backward(analytic), backward(splat)
        out["tb_analytic"] = timed(lambda: backward(analytic), repeat, device)
        out["grad_corr"] = float((ga * gs).sum() / (ga.norm() * gs.norm()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", default="500,2000,8000,32000", help="atom counts, comma-separated")
    p.add_argument("--boxes", default="64,128", help="image boxes (pixels), comma-separated")
    p.add_argument("--apix", type=float, default=2.0, help="Å/pixel at box 64 (kept field of view: scaled by box)")
    p.add_argument("--resolution_A", type=float, default=6.0, help="resolution of the Gaussians (Å)")
    p.add_argument("--batch", type=int, default=32, help="images per call")
    p.add_argument("--oversample", default="2", help="splatting grid oversampling factors, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_gb", type=float, default=2.0, help="skip the analytic backward when its saved phases "
                   "exceed this (GB)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print("| N atoms | box | M pixels | os | analytic fwd (s) | splat fwd (s) | speed-up | analytic fwd+bwd (s) "
          "| splat fwd+bwd (s) | speed-up | min shell corr | max shell amplitude dev | position-gradient corr |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for box in (int(b) for b in a.boxes.split(",")):
        apix = a.apix * 64 / box
        for n in (int(v) for v in a.atoms.split(",")):
            for os_ in (int(v) for v in a.oversample.split(",")):
                r = case(n, box, apix, max(a.resolution_A * 64 / box, 3 * apix), a.batch, os_, a.repeat, device,
                         a.max_gb * 1e9)
                back = (f"{r['tb_analytic']:.3f} | {r['tb_splat']:.3f} | {r['tb_analytic'] / r['tb_splat']:.1f}×"
                        if "tb_analytic" in r else f"— | {r['tb_splat']:.3f} | —")
                grad = f"{r['grad_corr']:.3f}" if "grad_corr" in r else "—"
                print(f"| {r['N']} | {r['box']} | {r['M']} | {r['os']} | {r['t_analytic']:.3f} | {r['t_splat']:.3f} "
                      f"| {r['t_analytic'] / r['t_splat']:.1f}× | {back} | {r['corr']:.5f} | {100 * r['dev']:.2f} % "
                      f"| {grad} |", flush=True)


if __name__ == "__main__":
    main()
