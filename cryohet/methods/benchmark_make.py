"""``cryohet benchmark-make``: CryoBench-style simulated datasets with ground truth, for scoring methods."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.methods.base import Method, Param
from cryohet.validation.datasets import DATASETS, DEFAULT_STATES, MOTION_DATASETS

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("dataset", str, "all", "Which dataset: " + "; ".join(f"{k}: {v}" for k, v in DATASETS.items())
          + "; all: each motion dataset (" + ", ".join(MOTION_DATASETS) + ") in its own subfolder.",
          choices=tuple(DATASETS) + ("all",)),
    Param("box", int, 64, "Image and map size, pixels (even).", min=16, max=512),
    Param("apix", float, 0.0, "Pixel size, Å/pixel. 0: 128 Å / box (a 128 Å field of view).", min=0.0, max=50.0),
    Param("n_particles", int, 1000, "Number of particle images per dataset.", min=10),
    Param("snr", float, 0.1, "Signal-to-noise ratio: variance of the noise-free images inside the particle's circle "
          "over the noise variance.", min=1e-6),
    Param("n_states", int, 0, "Number of true maps: points along a 1-D motion, grid points per axis for "
          "two-part (n² maps), states for discrete (0: defaults "
          + ", ".join(f"{k} {v}" for k, v in DEFAULT_STATES.items()) + ").", min=0, max=1000),
    Param("populations", str, None, "Fractions of particles per true map, comma-separated (one per map; normalised). "
          "Empty: uniform for continuous motions, ∝ K, K−1, …, 1 for discrete states (0.4/0.3/0.2/0.1 for 4)."),
    Param("resolution_A", float, 0.0, "Resolution of the true maps made from atoms, Å. 0: max(6, 2.5 × apix).",
          min=0.0, expert=True),
    Param("defocus_min_A", float, 10000.0, "Smallest defocus (underfocus), Å.", min=0.0),
    Param("defocus_max_A", float, 25000.0, "Largest defocus (underfocus), Å.", min=0.0),
)


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.validation.datasets import make_dataset

    if params["box"] % 2:
        raise ValueError(f"--box must be even, got {params['box']}")
    if params["defocus_max_A"] < params["defocus_min_A"]:
        raise ValueError("--defocus_max_A is smaller than --defocus_min_A")
    names = list(MOTION_DATASETS) if params["dataset"] == "all" else [params["dataset"]]
    pops = None
    if (params["populations"] or "").strip():
        if len(names) > 1:
            raise ValueError("--populations needs one --dataset (the number of maps differs between datasets)")
        try:
            pops = np.array([float(x) for x in params["populations"].split(",")])
        except ValueError:
            raise ValueError(f"--populations: expected comma-separated numbers, got {params['populations']!r}"
                             ) from None
    for name in names:
        folder = ctx.out_dir if len(names) == 1 else ctx.out_dir / name
        ds = make_dataset(name, folder, box=params["box"], apix=params["apix"] or None,
                          n_particles=params["n_particles"], snr=params["snr"], n_states=params["n_states"] or None,
                          populations=pops, resolution_A=params["resolution_A"] or None,
                          defocus_range_A=(params["defocus_min_A"], params["defocus_max_A"]), seed=ctx.seed,
                          device=str(ctx.device), log=ctx.log, progress=ctx.progress)
        ctx.log.info("%s: %d particles, %d true maps (%s, τ dimension %d), box %d, %.3g Å/px, SNR %g", name,
                     ds.n_particles, ds.n_states, ds.kind, ds.latent_dim, ds.box, ds.apix, params["snr"])
        ctx.add("particles_star", ds.particles_star, f"benchmark {name}: particles (truth in cryohetTrue* columns)",
                dataset=name, n_particles=ds.n_particles, apix=ds.apix, box=ds.box, snr=params["snr"])
        for k, path in enumerate(ds.map_paths):
            ctx.add("volume_series", path, f"benchmark {name}: true map {k}", series=f"{name}_true", index=k,
                    tau=np.round(ds.state_tau[k], 6).tolist())
        ctx.add("ground_truth", folder / "ground_truth.npz", f"benchmark {name}: per-particle ground truth",
                dataset=name, conf_kind=ds.kind, tau_dim=ds.latent_dim, n_states=ds.n_states,
                benchmark=str((folder / "benchmark.json").relative_to(ctx.out_dir)))


METHOD = Method(
    name="benchmark-make",
    order=80,
    title="Benchmark datasets with ground truth",
    help="Simulate CryoBench-style datasets from the bundled adenylate kinase (open 4AKE / closed 1AKE) with "
         "realistic CTF and noise: a 1-D hinge motion, a 1-D interpolation between two atomic models, a 2-D motion "
         "of two independent domains, discrete states with uneven populations, and (junk) outliers: 10 % junk "
         "images (pure noise, another molecule, off-centre particles) and a 2 % rare state. Each dataset folder holds "
         "particles.star/.mrcs, ground_truth.npz, maps/state_XXX.mrc and benchmark.json; score a method's result "
         "on it with cryohet benchmark-score.",
    params=PARAMS,
    outputs=("particles_star", "volume_series", "ground_truth"),
    run=run,
    citations=("Jeon et al. (2024) CryoBench: diverse and challenging datasets for the heterogeneity problem in "
               "cryo-EM. NeurIPS Datasets and Benchmarks.",),
)
