"""The covariance filters' voxel weights on images made from a known motion: how well the leading filter reads each
image's coordinate, for four view distributions, two motion directions and two noise seeds.

The images are ``tests/test_filter_covariance.py``'s (box 24, 600 particles, a blob pair moved by ±3 px, a CTF-like
sign pattern, white noise of ``--noise`` times the signal's s.d. in the filters' circle: 2, 4, 6 are SNR about
0.25, 0.06, 0.03 there). Each cell is |r| of the leading filter's responses with the coordinate for noise seeds 1
and 2, against the motion's own map as the filter (the best a filter can do). The variants set
``filter_covariance``'s constants in this process:

* ``default``: S = 1 / (D + f·D̄ + τ), the density floor and the Wiener term, τ from each shell's power above the
  noise less two standard errors of it (``NOISE_MARGIN`` 2);
* ``no-margin``: τ from the power above the noise itself (stop 39's default, ``NOISE_MARGIN`` 0);
* ``no-wiener``: S = 1 / (D + f·D̄) (stop 38's default, ``WIENER`` 0);
* ``1/D``: S = 1 / D (stop 37's, ``WIENER`` and ``DENSITY_FLOOR`` 0).

Each row also gives the largest shell SNR that ``covariance_filters`` estimates from pure-noise residuals at those
views (three noise draws; with no conformations every shell's is 0).

    .venv/bin/python bench/bench_covariance_weights.py --noise 4 6   # docs/benchmarks.md, "Low SNR"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_filter_covariance import (  # noqa: E402  (the test's images and scores)
    VIEWS,
    _motion_responses,
    _pure_noise_snr,
    views,
)

import cryohet.inference.filter_covariance as fc  # noqa: E402

VARIANTS = {"default": (fc.DENSITY_FLOOR, fc.WIENER, fc.NOISE_MARGIN), "no-margin": (fc.DENSITY_FLOOR, fc.WIENER, 0.0),
            "no-wiener": (fc.DENSITY_FLOOR, 0.0, 0.0), "1/D": (0.0, 0.0, 0.0)}
MOTIONS = {"x": (3.0, 0.0, 0.0), "z": (0.0, 0.0, 3.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[2.0, 4.0, 6.0],
                    help="noise s.d. over the signal's in the filters' circle")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    print("largest shell SNR estimated from pure noise (no conformations: 0), three draws\n")
    print("| views | " + " | ".join(args.variants) + " |")
    print("|---" * (len(args.variants) + 1) + "|")
    for kind in VIEWS:
        rot = views(kind, 600, np.random.default_rng(5))
        cells = []
        for name in args.variants:
            fc.DENSITY_FLOOR, fc.WIENER, fc.NOISE_MARGIN = VARIANTS[name]
            cells.append(f"{max(float(_pure_noise_snr(rot, seed).max()) for seed in (1, 2, 3)):.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    for noise in args.noise:
        print(f"\nnoise {noise:g} (SNR about {1 / noise**2:.2g}): |r| for noise seeds 1 / 2\n")
        print("| views, motion | " + " | ".join(args.variants) + " | the motion's own |")
        print("|---" * (len(args.variants) + 2) + "|")
        for kind in VIEWS:
            for axis, motion in MOTIONS.items():
                rot = views(kind, 600, np.random.default_rng(5))
                cells, best = [], []
                for name in args.variants:
                    fc.DENSITY_FLOOR, fc.WIENER, fc.NOISE_MARGIN = VARIANTS[name]
                    runs = [_motion_responses(rot, motion, noise, seed)[:2] for seed in (1, 2)]
                    cells.append(" / ".join(f"{r:.2f}" for r, _ in runs))
                    best = [b for _, b in runs]
                print(f"| {kind}, along {axis} | " + " | ".join(cells) + " | "
                      + " / ".join(f"{b:.2f}" for b in best) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
