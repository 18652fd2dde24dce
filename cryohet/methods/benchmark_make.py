"""``cryohet benchmark-make``: CryoBench-style simulated datasets with ground truth, for scoring methods."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.methods.base import Method, Param
from cryohet.simulate.views import TOP_VIEW_SD_DEG
from cryohet.validation.datasets import CRYOBENCH, DATASETS, DEFAULT_STATES, MOTION_DATASETS, SIZES

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("dataset", str, "all", "Which dataset: " + "; ".join(f"{k}: {v}" for k, v in DATASETS.items())
          + "; all: each motion dataset (" + ", ".join(MOTION_DATASETS) + "), cryobench: the five CryoBench "
          "analogues, each in its own subfolder.", choices=tuple(DATASETS) + ("all", "cryobench")),
    Param("size", str, "custom", "Image settings: custom (--box, --apix, --snr, --defocus_*), or CryoBench's: full "
          "(box {f.box} at {f.apix:g} Å/px, SNR {f.snr:g}, origins uniform in ±{f.shift_max_px:g} px, defocus "
          "log-normal in {f.defocus_range_A[0]:.0f}-{f.defocus_range_A[1]:.0f} Å, {f.n_particles} particles) or cpu "
          "(the same field of view and shifts in Å at box {c.box}, {c.apix:g} Å/px, {c.n_particles} particles)."
          .format(f=SIZES["full"], c=SIZES["cpu"]), choices=("custom",) + tuple(SIZES)),
    Param("box", int, 64, "Image and map size, pixels (even; --size custom).", min=16, max=512),
    Param("apix", float, 0.0, "Pixel size, Å/pixel (--size custom). 0: 128 Å / box (a 128 Å field of view), "
          "384 Å / box for the CryoBench analogues.", min=0.0, max=50.0),
    Param("n_particles", int, 0, "Number of particle images per dataset. 0: 1000, or the --size preset's.", min=0),
    Param("snr", float, 0.1, "(--size custom) Signal-to-noise ratio: variance of the noise-free images inside the "
          "particle's circle over the noise variance.", min=1e-6),
    Param("n_states", int, 0, "Number of true maps: points along a 1-D motion, grid points per axis for "
          "two-part (n² maps), states for discrete (0: defaults "
          + ", ".join(f"{k} {v}" for k, v in DEFAULT_STATES.items()) + ").", min=0, max=1000),
    Param("populations", str, None, "Fractions of particles per true map, comma-separated (one per map; normalised). "
          "Empty: uniform for continuous motions, ∝ K, K−1, …, 1 for discrete states (0.4/0.3/0.2/0.1 for 4)."),
    Param("resolution_A", float, 0.0, "Resolution of the true maps made from atoms, Å. 0: max(6, 2.5 × apix).",
          min=0.0, expert=True),
    Param("defocus_min_A", float, 10000.0, "Smallest defocus (underfocus), Å.", min=0.0),
    Param("defocus_max_A", float, 25000.0, "Largest defocus (underfocus), Å.", min=0.0),
    Param("top_view_fraction", float, 0.0, "Preferred orientations: the fraction of the particles tilted only "
          f"|N(0, {TOP_VIEW_SD_DEG:g}°)| from the top view; the rest uniform.", min=0.0, max=1.0),
)


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.validation.datasets import make_dataset

    if params["box"] % 2 and params["size"] == "custom":
        raise ValueError(f"--box must be even, got {params['box']}")
    if params["defocus_max_A"] < params["defocus_min_A"]:
        raise ValueError("--defocus_max_A is smaller than --defocus_min_A")
    groups = {"all": list(MOTION_DATASETS), "cryobench": list(CRYOBENCH)}
    names = groups.get(params["dataset"], [params["dataset"]])
    preset = SIZES.get(params["size"])
    if preset is None:
        img = dict(box=params["box"], apix=params["apix"] or None, snr=params["snr"],
                   defocus_range_A=(params["defocus_min_A"], params["defocus_max_A"]))
        n_particles = params["n_particles"] or 1000
    else:
        img = dict(box=preset.box, apix=preset.apix, snr=preset.snr, defocus_range_A=preset.defocus_range_A,
                   shift_max_px=preset.shift_max_px, defocus_lognormal=True, astigmatism_A=preset.astigmatism_A)
        n_particles = params["n_particles"] or preset.n_particles
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
        ds = make_dataset(name, folder, n_particles=n_particles, n_states=params["n_states"] or None,
                          populations=pops, resolution_A=params["resolution_A"] or None, seed=ctx.seed,
                          top_view_fraction=params["top_view_fraction"],
                          device=str(ctx.device), log=ctx.log, progress=ctx.progress, **img)
        ctx.log.info("%s: %d particles, %d true maps (%s, τ dimension %d), box %d, %.3g Å/px, SNR %g%s", name,
                     ds.n_particles, ds.n_states, ds.kind, ds.latent_dim, ds.box, ds.apix, img["snr"],
                     f", {params['top_view_fraction']:.0%} near the top view" if params["top_view_fraction"] else "")
        ctx.add("particles_star", ds.particles_star, f"benchmark {name}: particles (truth in cryohetTrue* columns)",
                dataset=name, n_particles=ds.n_particles, apix=ds.apix, box=ds.box, snr=img["snr"])
        if (folder / "trajectory" / "topology.pdb").is_file():
            ctx.add("atomic_model", folder / "trajectory" / "topology.pdb", f"benchmark {name}: first frame of the "
                    "trajectory of its true maps (all frames: trajectory/frames.dcd)")
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
         "of two independent domains, discrete states with uneven populations, (junk) outliers: 10 % junk "
         "images (pure noise, another molecule, off-centre particles) and a 2 % rare state, and analogues of "
         "CryoBench's five sets (IgG-1D, IgG-RL, Ribosembly, Tomotwin-100, Spike-MD) built from AdK copies, at "
         "CryoBench's image settings (--size full) or a CPU-sized variant (--size cpu). Each dataset folder holds "
         "particles.star/.mrcs, ground_truth.npz, maps/state_XXX.mrc and benchmark.json; score a method's result "
         "on it with cryohet benchmark-score.",
    params=PARAMS,
    outputs=("particles_star", "volume_series", "ground_truth", "atomic_model"),
    run=run,
    citations=("Jeon et al. (2024) CryoBench: diverse and challenging datasets for the heterogeneity problem in "
               "cryo-EM. NeurIPS Datasets and Benchmarks.",),
)
