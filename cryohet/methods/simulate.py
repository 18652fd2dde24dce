"""``cryohet simulate``: particle images with ground truth, from an atomic model in motion or from maps."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import Method, Param

MOTIONS = ("hinge", "two_part", "interpolate", "maps")

PARAMS = (
    Param("molecule", Path, None, "Atomic model (PDB or mmCIF) to simulate. Default: the bundled E. coli adenylate "
          "kinase (open form, PDB 4AKE chain A, 214 residues, about 70 Å long)."),
    Param("motion", str, "hinge", "How the molecule moves: hinge (one part rotates about a hinge: the bundled "
          "molecule's LID domain closing), two_part (two parts move independently, a 2-D motion: LID and NMP), "
          "interpolate (linear path from the molecule to --second_model), maps (a series of maps, --maps).",
          choices=MOTIONS),
    Param("second_model", Path, None, "For motion=interpolate: the end model (PDB/mmCIF; atoms matched by chain, "
          "residue and atom name). Default with the bundled molecule: its closed form (PDB 1AKE)."),
    Param("maps", str, "", "For motion=maps: the maps in order, as a glob pattern (sorted by name) or a "
          "comma-separated list of MRC files with one box and pixel size (--box and --apix are then taken from them)."),
    Param("discrete", bool, False, "For motion=maps: the maps are discrete states (τ = map index) rather than points "
          "along one continuous motion (τ from 0 to 1).", expert=True),
    Param("moving", str, "", "Residues that move, as [chain:]first-last[,...] (for two_part, two groups separated by "
          "';'). Empty: the LID (and NMP) domain of the bundled molecule, otherwise found automatically.", expert=True),
    Param("n_states", int, 20, "Number of conformations (maps) sampled along the motion; two_part uses a grid of "
          "ceil(√n) × ceil(√n). 1 gives a homogeneous data set.", min=1, max=1000),
    Param("max_angle_deg", float, 50.0, "Hinge rotation at the end of the motion (τ = 1), degrees. The bundled LID "
          "closes by 52°, its NMP domain by 45°.", min=-180.0, max=180.0),
    Param("n_particles", int, 2000, "Number of particle images.", min=1),
    Param("box", int, 64, "Image and map size, pixels (even).", min=16, max=1024),
    Param("apix", float, 2.0, "Pixel size, Å/pixel.", min=0.1, max=50.0),
    Param("resolution_A", float, 6.0, "Resolution of the maps made from atoms, Å: Gaussian atoms of width "
          "0.225 × this, low-passed at this (at least 2 × apix).", min=0.5),
    Param("snr", float, 0.1, "Signal-to-noise ratio: variance of the noise-free images inside the particle's circle "
          "over the noise variance. Images are scaled to unit noise variance. 0: no noise.", min=0.0),
    Param("defocus_min_A", float, 10000.0, "Smallest defocus (underfocus), Å.", min=0.0),
    Param("defocus_max_A", float, 25000.0, "Largest defocus (underfocus), Å.", min=0.0),
    Param("astigmatism_A", float, 500.0, "Largest astigmatism |DefocusU - DefocusV|, Å (uniform from 0; random "
          "angle).", min=0.0, expert=True),
    Param("shift_sigma_A", float, 2.0, "Standard deviation of the particle origins (rlnOriginX/YAngst), Å.", min=0.0),
    Param("voltage_kV", float, 300.0, "Acceleration voltage, kV.", min=1.0),
    Param("cs_mm", float, 2.7, "Spherical aberration, mm.", min=0.0),
    Param("amp_contrast", float, 0.1, "Amplitude contrast (fraction).", min=0.0, max=0.99),
    Param("image_paths", str, "star", "How rlnImageName refers to particles.mrcs: relative to the STAR file's folder "
          "(star), to the current folder (cwd: RELION's project-folder convention) or absolute.",
          choices=("star", "cwd", "absolute"), expert=True),
)


def build_conformations(params: dict[str, Any], device: Any = "cpu"):
    """The family of maps described by the parameters (see PARAMS)."""
    from cryohet.simulate import molecules, motions

    motion = params["motion"]
    if motion == "maps":
        if not params["maps"]:
            raise ValueError("--maps is required for motion=maps")
        return motions.maps_conformations(params["maps"], discrete=bool(params["discrete"]))
    box, apix, res = params["box"], params["apix"], params["resolution_A"]
    if box % 2:
        raise ValueError(f"--box must be even, got {box}")
    if res < 2 * apix:
        raise ValueError(f"--resolution_A {res} is finer than Nyquist (2 × apix = {2 * apix} Å)")
    bundled = params["molecule"] is None
    st = molecules.default_molecule() if bundled else molecules.load_structure(params["molecule"])
    common = dict(box=box, apix=apix, resolution_A=res, device=str(device))
    moving = [s.strip() for s in (params["moving"] or "").split(";")]
    if motion == "hinge":
        return motions.hinge_conformations(st, params["n_states"], params["max_angle_deg"], hinge=moving[0] or None,
                                           **common)
    if motion == "two_part":
        if len(moving) not in (1, 2) or (len(moving) == 1 and moving[0]):
            raise ValueError("--moving for two_part needs two groups separated by ';' (or nothing)")
        pair = (moving + [""])[:2]
        n_axis = max(2, math.ceil(math.sqrt(params["n_states"])))
        return motions.two_part_conformations(st, n_axis, params["max_angle_deg"],
                                              hinges=(pair[0] or None, pair[1] or None), **common)
    # interpolate
    if params["second_model"] is not None:
        second = molecules.load_structure(params["second_model"])
    elif bundled:
        second = molecules.default_molecule(closed=True)
    else:
        raise ValueError("--second_model is required for motion=interpolate with your own --molecule")
    return motions.interpolation_conformations(st, second, params["n_states"], **common)


def run(params: dict[str, Any], ctx) -> None:
    from cryohet.simulate.simulate import simulate_particles

    if params["defocus_max_A"] < params["defocus_min_A"]:
        raise ValueError("--defocus_max_A is smaller than --defocus_min_A")
    conf = build_conformations(params, ctx.device)
    ctx.log.info("%d %s conformation(s), τ dimension %d, box %d, %.3f Å/pixel (%s)", conf.n_states, conf.kind,
                 conf.dim, conf.box, conf.apix, params["motion"])
    snr = params["snr"] if params["snr"] > 0 else None
    out = simulate_particles(conf, ctx.out_dir, params["n_particles"], snr,
                             defocus_range_A=(params["defocus_min_A"], params["defocus_max_A"]),
                             astigmatism_A=params["astigmatism_A"], shift_sigma_A=params["shift_sigma_A"],
                             voltage_kV=params["voltage_kV"], cs_mm=params["cs_mm"],
                             amp_contrast=params["amp_contrast"], seed=ctx.seed, device=ctx.device,
                             progress=ctx.progress, image_paths=params["image_paths"])
    ctx.log.info("noise sigma %.4g (projection units), particle radius %.1f Å, images scaled by %.4g",
                 out.noise_sigma, out.meta["particle_radius_A"], out.image_scale)
    ctx.add("particles_star", out.particles_star, "simulated particles (ground truth in cryohetTrue* columns)",
            n_particles=out.n_particles, apix=conf.apix, box=conf.box, snr=snr)
    for k, path in enumerate(out.map_paths):
        ctx.add("volume_series", path, f"true map of state {k}", series="true_states", index=k,
                tau=np.round(conf.tau[k], 6).tolist())
    if out.mean_map is not None:
        ctx.add("volume", out.mean_map, "population-weighted mean of the true maps")
    meta = {k: v for k, v in conf.meta.items() if isinstance(v, (str, int, float, list))}
    ctx.add("ground_truth", out.ground_truth, "per-particle state, τ, pose, origin, CTF; τ of the maps",
            conf_kind=conf.kind, tau_dim=conf.dim, n_states=conf.n_states, **meta)


METHOD = Method(
    name="simulate",
    order=10,
    title="Simulate particles with ground truth",
    help="Simulate cryo-EM particle images of a molecule in motion (a hinge, two independent parts, an interpolation "
         "between two models) or of a series of maps: uniform random poses, Gaussian origins, CTF over a defocus "
         "range, Gaussian noise at a chosen SNR. Writes particles.star (RELION 3.1) + particles.mrcs, "
         "ground_truth.npz (per-particle conformation τ and state, rows in STAR order) and the true maps "
         "(maps/state_XXX.mrc, maps/mean.mrc). With no --molecule, the bundled adenylate kinase is used.",
    params=PARAMS,
    outputs=("particles_star", "volume_series", "volume", "ground_truth"),
    run=run,
    citations=("Müller, Schlauderer, Reinstein & Schulz (1996) Structure 4:147 (PDB 4AKE, bundled molecule)",
               "Müller & Schulz (1992) J. Mol. Biol. 224:159 (PDB 1AKE, bundled closed form)"),
)
