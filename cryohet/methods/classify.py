"""``cryohet classify``: 3-D classification of particles with fixed poses (RELION's Class3D with --skip_align)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import DATADIR, Method, Param

#: width of the solvent mask's cosine edge, Å
SOLVENT_EDGE_A = 5.0

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF: RELION STAR (3.0/3.1/5) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("K", int, 3, "Number of classes.", min=1, max=200),
    Param("references", str, "", "Starting maps, one per class: a comma-separated list of K MRC files with the "
          "particles' box and pixel size. Empty: each class starts as the reconstruction of a random 1/K of the "
          "particles."),
    Param("init", str, "pca", "How classes start when no --references are given: pca (clusters of a Gaussian "
          "mixture over the particles' coordinates on K − 1 principal volumes at --init_resolution_A; discrete "
          "states separate along them) or random (each class reconstructed from a random 1/K of the particles, as "
          "RELION).", choices=("pca", "random")),
    Param("init_resolution_A", float, 20.0, "Resolution of the principal volumes of --init pca and of the splits "
          "that reseed empty classes, Å.", min=0.0,
          expert=True),
    Param("mask", Path, None, "Optional focus mask (MRC, the particles' box and pixel size, values 0-1): classes "
          "differ only inside it; outside it every class is scored with the population-weighted mean map.",
          input_role="mask"),
    Param("particle_diameter_A", float, 0.0, "Diameter of the soft spherical solvent mask put on the class maps before "
          "they are compared with the images (as RELION's --particle_diameter with --flatten_solvent --zero_mask), "
          "Å; 0: the box's inscribed sphere. Less noise in the references separates states at low SNR.", min=0.0),
    Param("iterations", int, 25, "EM iterations (RELION's default for 3-D classification is 25).", min=1, max=1000),
    Param("tau2_fudge", float, 1.0, "Regularisation parameter T: each class map's Wiener filter uses T × the "
          "signal-to-noise ratio that its half-map FSC shows. Above 1 trusts the data more (sharper, noisier "
          "maps and more decisive assignments); below 1 smooths more. (RELION's T scales a power-spectrum "
          "estimate instead; its default 4 for classification corresponds roughly to 1 here.)", min=0.01, max=100.0),
    Param("ini_high_A", float, 30.0, "Starting maps are low-passed to this resolution, Å, and the first iteration "
          "scores the images up to it; later iterations go as far as every populated class's FSC 0.143. "
          "0: no low-pass.", min=0.0),
    Param("resolution_A", float, 0.0, "Never score the images beyond this resolution, Å (the images are Fourier-"
          "cropped to the box it needs, which also makes the run faster). 0: the images' Nyquist.", min=0.0),
    Param("min_class_fraction", float, 0.01, "A class holding less than this fraction of the particles is "
          "reseeded by splitting the class whose particles fit worst in two along its first principal volume (at most "
          "--max_reseeds times per class, never in the last iteration); a class still below it at the end is "
          "reported as empty.", min=0.0, max=0.5),
    Param("max_reseeds", int, 3, "Times a class may be reseeded.", min=0, expert=True),
    DATADIR,
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (checkpoint.safetensors, "
          "written after every iteration; the one before is kept as checkpoint.prev.safetensors); --iterations is the "
          "new total. The other settings must be the same."),
)


def _read_references(spec: str, K: int, box: int, apix: float) -> np.ndarray | None:
    from cryohet.io.mrc import read_map_like

    paths = [s.strip() for s in spec.split(",") if s.strip()]
    if not paths:
        return None
    if len(paths) != K:
        raise ValueError(f"--references: {len(paths)} maps given for --K {K} classes (give one map per class, "
                         "or none)")
    return np.stack([read_map_like(p, box, apix, "--references") for p in paths])


def _plot_history(path: Path, history: list[dict[str, Any]]) -> Path:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    it = [h["iteration"] for h in history]
    pops = np.array([h["populations"] for h in history])
    res = np.array([h["resolution_A"] for h in history])
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3)
    for k in range(pops.shape[1]):
        a1.plot(it, 100 * pops[:, k], marker=".", label=f"class {k + 1}")
        a2.plot(it, res[:, k], marker=".")
    for h in history:
        if h["reseeded"]:
            a1.axvline(h["iteration"], color="grey", lw=0.6, ls=":")
    a1.set(xlabel="iteration", ylabel="population (%)", title="class populations")
    a2.set(xlabel="iteration", ylabel="resolution at FSC 0.143 (Å)", title="class resolutions")
    a2.plot(it, [h["limit_A"] for h in history], color="black", ls="--", label="scored to")
    a2.invert_yaxis()
    a2.legend(fontsize=7)
    a3.plot(it, [100 * h["changed"] for h in history], marker=".", color="C3")
    a3.set(xlabel="iteration", ylabel="% of particles", title="changed class", yscale="symlog")
    if pops.shape[1] <= 12:
        a1.legend(fontsize=7)
    return save_png(fig, path, dpi=90)


def _plot_probabilities(path: Path, probabilities: np.ndarray) -> Path:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(probabilities.max(1), bins=50, range=(0, 1), color="C0")
    ax.set(xlabel="probability of the most probable class (rlnMaxValueProbDistribution)", ylabel="particles",
           yscale="log")
    return save_png(fig, path, dpi=90)


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.atomic import save_npy
    from cryohet.errors import InputError
    from cryohet.geometry.fourier import fourier_crop_3d
    from cryohet.geometry.lattice import Lattice, box_for_resolution
    from cryohet.geometry.masks import sphere_mask
    from cryohet.inference.classify_em import fit_classes, initial_classes_from_pca
    from cryohet.io.mrc import read_mask, write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._fit_outputs import fit_columns
    from cryohet.reconstruct.homogeneous import particle_halves
    from cryohet.validation.goodness import maps_predictor

    pset = load_particles(params["particles"], params["datadir"] or None)
    K = params["K"]
    if len(pset) < 4 * K:
        raise ValueError(f"{len(pset)} particles are too few for {K} classes (at least 4 per class)")
    refs = _read_references(params["references"], K, pset.box, pset.apix)
    focus = read_mask(params["mask"], pset.box, pset.apix) if params["mask"] else None
    lattice = Lattice(pset.box, pset.apix).cropped(box_for_resolution(pset.box, pset.apix, params["resolution_A"]))
    n = lattice.box
    if n < pset.box:
        ctx.log.info("images Fourier-cropped from %d to %d px (%.3f Å/px) for --resolution_A %g", pset.box, n,
                     lattice.apix, params["resolution_A"])
    device = ctx.device
    crop = (lambda v: fourier_crop_3d(torch.as_tensor(v, dtype=torch.float32), n)) if n < pset.box else \
        (lambda v: torch.as_tensor(v, dtype=torch.float32))
    references = torch.stack([crop(v) for v in refs]) if refs is not None else None
    focus_t = crop(focus).clamp(0, 1) if focus is not None else None
    solvent = None
    if params["particle_diameter_A"] > 0:
        radius_px = params["particle_diameter_A"] / (2 * lattice.apix)
        if radius_px > n / 2:
            raise InputError(params["particles"], f"--particle_diameter_A {params['particle_diameter_A']:g} is "
                             f"wider than the box ({n * lattice.apix:.1f} Å)")
        solvent = sphere_mask(n, radius_px, SOLVENT_EDGE_A / lattice.apix, device)
    half = particle_halves(pset, ctx.seed)
    out = Path(ctx.out_dir)
    initial = None
    resuming = params["resume"] and (out / "checkpoint.safetensors").exists()
    if references is None and params["init"] == "pca" and K > 1 and not resuming:
        ctx.log.info("starting classes: Gaussian mixture over %d principal volume(s) at %g Å", min(K - 1, 8),
                     params["init_resolution_A"])
        initial = initial_classes_from_pca(pset, K, resolution_A=params["init_resolution_A"], mask=focus,
                                           batch_size=params["batch_size"], device=device, seed=ctx.seed,
                                           log=ctx.log, progress=ctx.progress)
    ctx.log.info("%d particles, box %d at %.3f Å/px; %d classes; %d iterations; T = %g", len(pset), n, lattice.apix,
                 K, params["iterations"], params["tau2_fudge"])
    fit = fit_classes(pset, K, lattice=lattice, half=half, references=references, initial_classes=initial,
                      iterations=params["iterations"],
                      tau2_fudge=params["tau2_fudge"], ini_high_A=params["ini_high_A"],
                      resolution_A=params["resolution_A"], focus_mask=focus_t, solvent_mask=solvent,
                      min_class_fraction=params["min_class_fraction"], max_reseeds=params["max_reseeds"],
                      init_resolution_A=params["init_resolution_A"],
                      batch_size=params["batch_size"], device=device, seed=ctx.seed, log=ctx.log,
                      progress=ctx.progress, checkpoint=out / "checkpoint.safetensors", resume=params["resume"])
    last = fit.history[-1]
    ctx.report_convergence("classification EM (fraction of particles that changed class)", last["changed"] <= 0.01,
                           last["changed"], 0.01, len(fit.history))
    apix = fit.apix
    classes = fit.classes
    counts = np.bincount(classes - 1, minlength=K)
    empty = [k for k in range(K) if last["populations"][k] < params["min_class_fraction"]]
    for k in empty:
        ctx.log.warning("class %d is empty: %.2f %% of the particles (%d most probable) after %d reseed(s)", k + 1,
                        100 * last["populations"][k], counts[k], fit.reseeds[k])
    curves = {}
    for k in range(K):
        stem = f"class{k + 1:03d}"
        write_map(out / f"{stem}.mrc", fit.maps[k].cpu().numpy(), apix)
        for j in (0, 1):
            write_map(out / f"{stem}_half{j + 1}.mrc", fit.half_maps[k, j].cpu().numpy(), apix)
        write_fsc_star(out / f"{stem}_fsc.star", n, apix, fit.fsc[k])
        curves[f"class {k + 1}"] = fit.fsc[k]
        res = fit.resolution_A(k)
        meta = dict(series="classes", index=k, class_number=k + 1, population=float(last["populations"][k]),
                    n_particles=int(counts[k]), resolution_A=res, empty=k in empty)
        ctx.add("volume_series", f"{stem}.mrc", f"class {k + 1} ({100 * last['populations'][k]:.1f} %)", **meta)
        for j in (0, 1):
            ctx.add("half_map", f"{stem}_half{j + 1}.mrc", f"class {k + 1} half-map {j + 1}", class_number=k + 1,
                    apix=apix)
        ctx.add("fsc", f"{stem}_fsc.star", f"class {k + 1} half-map FSC", class_number=k + 1, resolution_A=res)
    plot_fsc(out / "fsc_classes.png", n, apix, curves)
    ctx.add("plot", "fsc_classes.png", "half-map FSC of each class")

    columns = {"rlnClassNumber": classes, "rlnMaxValueProbDistribution": fit.probabilities.max(1),
               "rlnLogLikeliContribution": fit.log_likelihood, "rlnRandomSubset": half}
    # each particle's image: its posterior mixture of the classes; a typical particle's: the populations' mixture
    pops = np.broadcast_to(np.asarray(last["populations"], dtype=np.float64), fit.probabilities.shape)
    columns |= fit_columns(ctx, pset, maps_predictor(fit.maps, fit.probabilities), maps_predictor(fit.maps, pops),
                           box=n, batch_size=params["batch_size"])
    write_particles_star(out / "particles.star", pset, extra_columns=columns)
    ctx.add("particles_star", "particles.star", "particles with their class (rlnClassNumber) and goodness of fit "
            "(cryohetFitZ, cryohetResidualZ)", n=len(pset),
            classes=K)
    for k in range(K):
        rows = np.nonzero(classes == k + 1)[0]
        if len(rows):
            name = f"particles_class{k + 1:03d}.star"
            write_particles_star(out / name, pset, extra_columns=columns, rows=rows)
            ctx.add("particles_star", name, f"particles of class {k + 1}", n=len(rows), class_number=k + 1)
    save_npy(out / "class_probabilities.npy", fit.probabilities.astype(np.float32))
    ctx.add("latents", "class_probabilities.npy", "posterior class probabilities (N × K, STAR row order)",
            content="class_probabilities", dim=K)
    _plot_history(out / "classes_per_iteration.png", fit.history)
    ctx.add("plot", "classes_per_iteration.png", "class populations, resolutions and class changes per iteration")
    _plot_probabilities(out / "probabilities.png", fit.probabilities)
    ctx.add("plot", "probabilities.png", "histogram of the most probable class's probability")
    ctx.log.info("classes: %s", "; ".join(f"{k + 1}: {counts[k]} particles, {fit.resolution_A(k):.1f} Å"
                                          for k in range(K)))


METHOD = Method(
    name="classify",
    order=25,
    title="3D classification with fixed poses",
    help="K classes by expectation-maximisation over the images at their consensus poses and CTF (as RELION's "
         "relion_refine --skip_align --K): per-shell Gaussian noise, posterior class probabilities with the class "
         "populations as priors, class maps from two half-sets with a Wiener filter from their FSC (times T), "
         "images scored up to the resolution every class reaches. Classes that empty are reseeded by splitting the "
         "class that fits its particles worst, and reported when they stay empty. Writes classNNN.mrc with "
         "half-maps and FSC, particles.star (rlnClassNumber, rlnMaxValueProbDistribution, goodness of fit "
         "cryohetFitZ and cryohetResidualZ under the particle's classes against the populations' mixture), "
         "particles_classNNN.star, "
         "class_probabilities.npy and plots of populations per iteration.",
    params=PARAMS,
    outputs=("volume_series", "half_map", "fsc", "particles_star", "latents", "plot"),
    run=run,
    citations=("Scheres SHW (2012) RELION: implementation of a Bayesian approach to cryo-EM structure "
               "determination. J Struct Biol 180:519-530.",
               "Scheres SHW (2016) Processing of structurally heterogeneous cryo-EM data in RELION. Methods Enzymol "
               "579:125-157."),
)
