"""``cryohet fit-modes``: per-particle normal-mode amplitudes of an atomic model (HEMNMA / DeepHEMNMA class)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import CACHE_PARAMS, Method, Param

PARAMS = (
    Param("particles", str, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("datadir", str, "", "Folder to look for the particle stacks in (empty: beside the particle file).",
          expert=True),
    Param("modes", str, None, "Normal modes: a modes.npz (eigenvalues, modes, coords_A in the particles' map "
          "frame, weight, atom names) or a cryohet nma run folder (its normal_modes output).", required=True,
          input_role="run"),
    Param("modes_used", str, "1-3", "Modes to fit, numbered from 1 (the lowest non-rigid mode): e.g. 1-3 or "
          "1,2,5."),
    Param("fit", str, "direct", "How amplitudes are found: direct (optimised image by image, HEMNMA) or amortised "
          "(an encoder of the image trained on all particles, DeepHEMNMA).", choices=("direct", "amortised")),
    Param("resolution_A", float, 8.0, "Resolution of the fit, Å: atoms are Gaussians of width 0.225 × this and "
          "only frequencies below 1/resolution are compared.", min=0.0),
    Param("pose_correction", bool, False, "Direct fit: also refine each particle's orientation (a small rotation) "
          "and origin; the corrected poses are written to the particles STAR."),
    Param("iterations", int, 60, "Direct fit: Adam steps per particle.", min=1),
    Param("lr_A", float, 0.5, "Direct fit: Adam step of the amplitudes, Å of RMS displacement (shifts: the same "
          "in Å; rotations: 1/50 of it in radians), decayed to 0 over the iterations.", min=0.0, expert=True),
    Param("starts", int, 1, "Direct fit: starts per particle (the first at 0, the others drawn with a standard "
          "deviation of 2 Å); the best is kept.", min=1, expert=True),
    Param("image_scale", bool, False, "Direct fit: fit each image's intensity scale (else one scale for all, "
          "estimated from the particles at amplitude 0).", expert=True),
    Param("epochs", int, 30, "Amortised fit: training epochs (passes over the particles).", min=1),
    Param("batch_size", int, 32, "Particles per step (direct: fitted together; amortised: per optimisation "
          "step).", min=1),
    Param("lr", float, 1e-3, "Amortised fit: Adam learning rate.", min=0.0, expert=True),
    Param("enc_layers", int, 3, "Amortised fit: encoder hidden layers.", min=1, max=32, expert=True),
    Param("enc_dim", int, 256, "Amortised fit: encoder layer width.", min=8, max=8192, expert=True),
    Param("beta", float, 0.01, "Amortised fit: weight of the KL term to the prior N(0, 1 Å²) on each amplitude "
          "(small: nearly a plain regression).", min=0.0, expert=True),
    Param("reference_map", str, "", "Optional map of the particles (same box and pixel size): the model is checked "
          "to fit it with the right hand.", input_role="volume"),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (direct: written "
          "after every chunk of particles; amortised: after every epoch, --epochs is the new total)."),
    Param("chunk_images", int, 1024, "Images read from disk per block (direct: per checkpoint); memory ~ "
          "chunk_images × box² × 4 bytes.", min=1, expert=True),
    *(replace(p, help=f"Amortised fit: {p.help[0].lower()}{p.help[1:]}") for p in CACHE_PARAMS),
)


def modes_file(path: str) -> Path:
    """The modes.npz of ``--modes``: the file itself, or a run folder's ``normal_modes`` output."""
    p = Path(path)
    if p.is_dir():
        from cryohet.errors import InputError
        from cryohet.record import read_record

        found = [o for o in read_record(p).of_kind("normal_modes") if str(o.path).endswith(".npz")]
        if not found:
            raise InputError(p, "the run folder holds no normal modes (.npz; a cryohet nma run writes modes.npz)")
        return p / found[0].path
    return p


def _plot_amplitudes(path: Path, z: np.ndarray, numbers: list[int]) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    k = z.shape[1]
    fig = Figure(figsize=(3.2 * k, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, k))
    for j, ax in enumerate(axes):
        ax.hist(z[:, j], bins=40, color=f"C{j}")
        ax.set(xlabel=f"mode {numbers[j]} amplitude (Å RMS)", ylabel="particles" if j == 0 else "")
    save_png(fig, path, dpi=100)


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.atomic import atomic_path
    from cryohet.data.prepare import ImagePreparer, transform_rms
    from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.mode_amortised import fit_amortised
    from cryohet.inference.mode_fit import DirectOptions, axis_angle_matrix, estimate_scale, fit_direct
    from cryohet.inference.trainer import Hooks, TrainOptions
    from cryohet.io.atomic_model import check_model, model_suffix, write_models
    from cryohet.io.normal_modes import parse_mode_list, read_normal_modes
    from cryohet.io.particles import load_particles
    from cryohet.methods._latent_outputs import write_latents
    from cryohet.models.modes import ModeModel

    if params["pose_correction"] and params["fit"] != "direct":
        raise ValueError("--pose_correction refines poses in the direct fit only (--fit direct)")
    out = Path(ctx.out_dir)
    src = modes_file(params["modes"])
    nm = read_normal_modes(src)
    numbers = parse_mode_list(params["modes_used"], len(nm), src)
    pset = load_particles(params["particles"], params["datadir"] or None)
    check_model(nm.atoms, pset.box, pset.apix, params["resolution_A"], params["reference_map"], ctx.log)
    res_A = params["resolution_A"]
    if not res_A >= 2 * pset.apix:
        raise ValueError(f"--resolution_A {res_A:g} is finer than Nyquist ({2 * pset.apix:g} Å at the particles' "
                         f"{pset.apix:g} Å/pixel)")
    model = ModeModel(nm.atoms, nm.modes[np.array(numbers) - 1], numbers, pset.box, pset.apix, res_A)
    lattice = Lattice(pset.box, pset.apix)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(pset.box * pset.apix / res_A))
    reader = pset.reader()
    prep.scale = model.data_scale = transform_rms(reader, prep, 1000, params["seed"])
    model.log_scale.data.fill_(float(np.log(estimate_scale(model, reader, prep, ctx.device, seed=params["seed"]))))
    ctx.log.info("%d atoms from %s, modes %s; %d frequencies below %g Å; scale %.4g", len(nm.atoms), src,
                 numbers, len(prep.points), res_A, float(model.log_scale.detach().exp()))
    hooks = Hooks.of(ctx)
    extra: dict[str, np.ndarray] = {}
    if params["fit"] == "direct":
        opts = DirectOptions(iterations=params["iterations"], lr_A=params["lr_A"], starts=params["starts"],
                             pose_correction=params["pose_correction"], image_scale=params["image_scale"],
                             batch_size=params["batch_size"], chunk_images=params["chunk_images"],
                             seed=params["seed"])
        res = fit_direct(model, reader, prep, opts, out, ctx.device, hooks, params["resume"])
        z = res.amplitudes_A
        ctx.log.info("direct fit: %.3g s per image; mean relative residual %.4f", res.seconds / max(len(pset), 1),
                     float(np.nanmean(res.residual)))
        if params["pose_correction"]:
            R = axis_angle_matrix(torch.as_tensor(np.deg2rad(res.rotation_deg)))
            eul = matrix_to_euler((R @ torch.as_tensor(euler_to_matrix(pset.euler_deg))).numpy())
            origin = pset.shift_A - res.shift_A  # the content moved by +s: RELION's origin moves by -s
            extra = {"rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
                     "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1]}
    else:
        topts = TrainOptions.from_params(params)
        _, tres = fit_amortised(model, reader, prep, topts, params["enc_layers"], params["enc_dim"],
                                params["beta"], out, ctx.device, hooks, params["resume"])
        z = tres.z_mu.astype(np.float64)
    k = len(numbers)
    model.save(out / "model.safetensors", {"fit": params["fit"], "particles": str(Path(params["particles"]).resolve()),
                                           "modes_file": str(src.resolve())})
    ctx.add("model", "model.safetensors", "atomic model moved along normal modes (fixed atoms, fitted scale)",
            model_type="normal_modes", latent_dim=k, box=pset.box, apix=pset.apix, modes=numbers, fit=params["fit"])
    write_latents(ctx, pset, {"amplitudes.npy": z.astype(np.float32)}, z,
                  f"normal-mode amplitudes (N, {k}), Å of RMS displacement over atoms, modes {numbers}",
                  f"particles with cryohetZ1..{k} (mode amplitudes, Å)", extra, fit_model=model, units="A_rms",
                  modes=numbers)
    _plot_amplitudes(out / "amplitudes.png", z, numbers)
    lo, hi = np.percentile(z, [5, 95], axis=0)
    suffix = model_suffix(None, len(nm.atoms))
    for i, m in enumerate(numbers):
        pts = np.zeros((5, k))
        pts[:, i] = np.linspace(lo[i], hi[i], 5)
        write_models(out / f"mode_{m}{suffix}", nm.atoms, model.frames_A(pts))
    with atomic_path(out / "fit.json") as tmp:
        tmp.write_text(json.dumps({"model": model.describe(), "fit": params["fit"], "n_particles": len(pset),
                                   "percentiles_5_95_A": [lo.tolist(), hi.tolist()]}, indent=1))
    ctx.add("plot", "amplitudes.png", "distribution of the amplitude of each mode")
    for m in numbers:
        ctx.add("atomic_model", f"mode_{m}{suffix}", f"5 models along mode {m}, from its 5th to its 95th percentile "
                "(other modes at 0)", mode=m)


METHOD = Method(
    name="fit-modes",
    order=42,
    title="Fit normal-mode amplitudes of an atomic model to each particle (HEMNMA, DeepHEMNMA)",
    help="Moves an atomic model along chosen normal modes (a cryohet nma run or a modes.npz) to explain each "
         "particle image: atoms are Gaussians projected analytically in Fourier space at the particle's pose, with "
         "its CTF and origin, and compared with the image below --resolution_A. --fit direct optimises each "
         "particle's amplitudes (and with --pose_correction a small rotation and shift) by batched gradient steps; "
         "--fit amortised trains an encoder that predicts them from the image. Amplitudes are in Å of RMS "
         "displacement over the atoms. Writes the model, the amplitudes (rows in particle-file order), the particles "
         "STAR with cryohetZ1..K, a plot of their distributions and atomic models along each mode. Checkpoints: per "
         "chunk of particles (direct) or per epoch (amortised); --resume yes continues.",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "plot", "atomic_model"),
    run=run,
    citations=("Jin, Sorzano, Lopez-Blanco, Chacon, Tama & Jonic (2014) Iterative elastic 3D-to-2D alignment method "
               "using normal modes for studying structural dynamics of large macromolecular complexes. Structure "
               "22, 496-506.",
               "Hamitouche & Jonic (2022) DeepHEMNMA: ResNet-based hybrid analysis of continuous conformational "
               "heterogeneity in cryo-EM single particle images. Frontiers in Molecular Biosciences 9, 965645."),
)
