"""``cryohet cryogan``: CryoGAN / Multi-CryoGAN, a map or a distribution of maps by adversarial matching of
simulated and real image distributions (survey section 8)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import DATADIR, Method, Param

PARAMS = (
    Param("particles", str, None, "Particles with CTF (poses used only with --poses known): RELION STAR (3.0, "
          "3.1+) or cryoSPARC .cs.", required=True, input_role="particles"),
    DATADIR,
    Param("poses", str, "unknown", "unknown: simulated images at uniformly random rotations (CryoGAN); known: at "
          "the particles' own rotations (an easier, paired mode).", choices=("unknown", "known")),
    Param("zdim", int, 0, "Latent dimension: 0 fits one map (CryoGAN); d > 0 a distribution V(z) = X_0 + Σ z_k W_k, "
          "z ~ N(0, I_d) (Multi-CryoGAN), whose principal volumes are written.", min=0, max=8),
    Param("resolution_A", float, 12.0, "Images are Fourier-cropped to this resolution, Å (the working box is the "
          "smallest multiple of 8 that reaches it, at most 128 px; 0: the images' Nyquist).", min=0.0),
    Param("diameter_A", float, 0.0, "Diameter of the soft sphere that holds the generated maps, Å (0: 0.9 of the "
          "box).", min=0.0),
    Param("steps", int, 1000, "Generator steps (each after --n_critic critic steps on fresh real batches).", min=1),
    Param("n_critic", int, 5, "Critic steps per generator step.", min=1, expert=True),
    Param("batch_size", int, 64, "Real (and as many simulated) images per critic step.", min=2, expert=True),
    Param("lr_generator", float, 0.3, "Adam's learning rate of the generator's voxels, in units of the voxel "
          "scale estimated from the images' signal power.", min=0.0, expert=True),
    Param("lr_critic", float, 1e-3, "Adam's learning rate of the critic.", min=0.0, expert=True),
    Param("gp_weight", float, 10.0, "Weight of the gradient penalty (WGAN-GP).", min=0.0, expert=True),
    Param("lowpass_start_A", float, 0.0, "Resolution of the Gaussian low-pass applied to real and simulated images "
          "at the start, Å (0: four times the working Nyquist); it rises to past Nyquist over --lowpass_until.",
          min=0.0, expert=True),
    Param("lowpass_until", float, 0.5, "Fraction of the steps over which the low-pass opens (0: none).", min=0.0,
          max=1.0, expert=True),
    Param("shift_range_A", float, 0.0, "Simulated images are moved by uniform random shifts within ± this, Å (the "
          "real images' origins in the input are undone first; this covers residual centring errors).", min=0.0),
    Param("halves", bool, False, "Train two independent GANs on the random half-sets (twice the time): half-maps and "
          "their FSC (the second superposed on the first by rotation and hand when poses are unknown); the map is "
          "their average and, with --zdim > 0, the principal volumes those of the two halves' mean covariance."),
    Param("movie_frames", int, 11, "Maps per movie X_0 + τ X_k (τ within ±2 s.d. of b_k), with --zdim > 0.",
          min=2, max=200),
    Param("checkpoint_every", int, 100, "Write the checkpoint every this many generator steps.", min=1,
          expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (checkpoint.safetensors; "
          "the one before is kept as checkpoint.prev.safetensors) up to --steps. The other settings must be the "
          "same."),
)

#: Relative change of the mean map over the last tenth of the steps that counts as converged.
CONVERGED_CHANGE = 0.05


def _plot_history(path: Path, history: list[dict[str, float]]) -> Path:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    step = [h["step"] for h in history]
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(step, [h["wasserstein"] for h in history], lw=0.8)
    ax1.set(xlabel="generator step", ylabel="critic's Wasserstein estimate")
    ax2.plot(step, [h["generator_loss"] for h in history], lw=0.8, color="C1")
    ax2.set(xlabel="generator step", ylabel="generator loss")
    ax3.plot(step, [h["lowpass_A"] for h in history], color="C2")
    ax3.set(xlabel="generator step", ylabel="low-pass (Å)")
    return save_png(fig, path, dpi=90)


def principal_volumes(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal principal volumes (K, ...) and their variances of V = X_0 + W z, z ~ N(0, I): the left singular
    vectors of W (K, ...) and its squared singular values (the covariance W Wᵀ's eigenpairs)."""
    K = len(W)
    U, S, _ = np.linalg.svd(W.reshape(K, -1).astype(np.float64).T, full_matrices=False)
    return U.T.reshape(W.shape).astype(np.float32), (S ** 2).astype(np.float64)


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.inference.cryogan import GanSettings, fit_cryogan
    from cryohet.inference.ppca import fourier_pad_3d
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import load_particles
    from cryohet.methods._linear_outputs import write_component_movies, write_linear_maps
    from cryohet.reconstruct.fsc import fsc, resolution_at
    from cryohet.reconstruct.homogeneous import particle_halves, reconstruct_halves
    from cryohet.validation.map_align import superpose

    known = params["poses"] == "known"
    pset = load_particles(params["particles"], params["datadir"] or None, require_poses=known)
    s = GanSettings(poses_known=known, **{k: params[k] for k in (
        "zdim", "resolution_A", "diameter_A", "steps", "n_critic", "batch_size", "lr_generator", "lr_critic",
        "gp_weight", "lowpass_start_A", "lowpass_until", "shift_range_A", "checkpoint_every")})
    out = Path(ctx.out_dir)
    box, apix = pset.box, pset.apix
    half = particle_halves(pset, ctx.seed)
    parts = ([("half 1", pset.subset(np.flatnonzero(half == 1)), "checkpoint_half1.safetensors"),
              ("half 2", pset.subset(np.flatnonzero(half == 2)), "checkpoint_half2.safetensors")]
             if params["halves"] else [("all", pset, "checkpoint.safetensors")])
    fits, full = [], []
    for name, part, ckpt in parts:
        ctx.log.info("CryoGAN on %s of the particles (%d)", name, len(part))
        fit = fit_cryogan(part, s, ctx.device, ctx.seed, ctx.log, checkpoint=out / ckpt, resume=params["resume"])
        ctx.report_convergence(f"CryoGAN, {name} (relative change of the moving-average map over the last tenth "
                               "of the steps)", fit.map_change <= CONVERGED_CHANGE, fit.map_change, CONVERGED_CHANGE,
                               len(fit.history))
        fits.append(fit)
        full.append(np.stack([fourier_pad_3d(torch.from_numpy(m), box).numpy() for m in fit.maps]))
    fit = fits[0]
    limit_A = 2 * fit.lattice.apix
    lines = [f"# CryoGAN: {len(pset)} particles, {params['poses']} poses, zdim {s.zdim}", "",
             f"- working box {fit.lattice.box} px ({fit.lattice.apix:.2f} Å/px, Nyquist {limit_A:.2f} Å), white "
             f"noise variance {fit.noise_var:.4g} (working-box transforms, from the corners), voxel scale "
             f"{fit.scale:.3g}"]
    for (name, _, _), f in zip(parts, fits):
        lines.append(f"- {name}: {len(f.history)} generator steps × {s.n_critic} critic steps, batches of "
                     f"{s.batch_size}; final Wasserstein estimate {f.history[-1]['wasserstein']:.4g}; relative "
                     f"change of the map over the last tenth of the steps {f.map_change:.3f}")
    if params["halves"]:
        if not known:
            full[1], mirrored = superpose(full[1], full[0][0])
            lines.append(f"- half 2 superposed on half 1 by rotation{' and hand' if mirrored else ''}")
        curve = fsc(full[0][0], full[1][0])
        res = resolution_at(curve, box, apix, 0.143)
        for j in (0, 1):
            write_map(out / f"half{j + 1}.mrc", full[j][0], apix)
            ctx.add("half_map", f"half{j + 1}.mrc", f"half-map {j + 1} (CryoGAN on half-set {j + 1})", apix=apix)
        write_fsc_star(out / "fsc.star", box, apix, curve)
        ctx.add("fsc", "fsc.star", "FSC between the half-maps", resolution_A=res)
        plot_fsc(out / "fsc.png", box, apix, {"CryoGAN half-maps": curve})
        ctx.add("plot", "fsc.png", "FSC between the half-maps")
        lines.append(f"- half-map FSC: {res:.2f} Å at 0.143")
        maps = (full[0] + full[1]) / 2
        W = np.concatenate([full[0][1:], full[1][1:]]) / np.sqrt(2)      # the halves' mean covariance
    else:
        maps = full[0]
        W = maps[1:]
    info = {"work_box": fit.lattice.box, "resolution_A": limit_A, "steps": len(fit.history), "zdim": s.zdim,
            "poses": params["poses"], "n_particles": len(pset), "halves": params["halves"]}
    if s.zdim:
        comps, variances = principal_volumes(W)
        comps, variances = comps[:s.zdim], variances[:s.zdim]
        model = write_linear_maps(ctx, pset, maps[0], comps, variances, resolution_A=limit_A, info=info,
                                  mean_label="mean X_0 of the generated distribution (moving average)")
        sd = np.sqrt(variances)
        write_component_movies(ctx, model, np.stack([-2 * sd, 2 * sd], 1), params["movie_frames"])
        lines.append(f"- variances of the generated distribution along its principal volumes: "
                     f"{np.array2string(variances, precision=4)}")
        map_name = "mean.mrc"
    else:
        write_map(out / "map.mrc", maps[0], apix)
        ctx.add("volume", "map.mrc", "CryoGAN map (moving average of the generator)", resolution_A=limit_A)
        map_name = "map.mrc"
    if known:
        # the generated map against the CTF-corrected backprojection of the same particles at their poses
        rec = reconstruct_halves(pset, half, 256, ctx.device, progress=ctx.progress)
        curve = fsc(maps[0], rec.full.cpu().numpy())
        res = resolution_at(curve, box, apix, 0.5)
        write_fsc_star(out / "fsc_to_backprojection.star", box, apix, curve)
        ctx.add("fsc", "fsc_to_backprojection.star", f"FSC of {map_name} to the backprojection of the particles",
                resolution_A=res, threshold=0.5)
        plot_fsc(out / "fsc_to_backprojection.png", box, apix, {"CryoGAN vs backprojection": curve},
                 ylabel="FSC to the backprojection")
        ctx.add("plot", "fsc_to_backprojection.png", "FSC of the generated map to the backprojection")
        lines.append(f"- FSC of {map_name} to the CTF-corrected backprojection of the particles at their poses: "
                     f"{res:.2f} Å at 0.5")
    _plot_history(out / "losses.png", [h for f in fits for h in f.history])
    ctx.add("plot", "losses.png", "critic's Wasserstein estimate, generator loss and low-pass per step")
    ctx.write_report(lines, "CryoGAN: settings, losses and maps")


METHOD = Method(
    name="cryogan",
    order=32,
    title="CryoGAN / Multi-CryoGAN: maps by adversarial matching of simulated and real images",
    help="A Wasserstein GAN with gradient penalty whose generator is the map itself (learnable voxels in a sphere) "
         "or, with --zdim > 0, a distribution of maps X_0 + Σ z_k W_k with z ~ N(0, I) (Multi-CryoGAN), and whose "
         "forward operator is the physical image model: Fourier slices at uniformly random rotations (or the "
         "particles' own with --poses known), the real particles' CTFs, random shifts and white noise of the "
         "variance of the images' corners. A small CNN critic compares batches of simulated and real images "
         "(streamed), both low-passed to a resolution that rises during training. No pose or latent is inferred "
         "per particle. Writes the map (a moving average of the generator's; the hand is undetermined with "
         "unknown poses) or the mean and principal volumes of the generated distribution with movies along them, "
         "with --halves two independent half-maps and their FSC, with known poses the FSC to the particles' "
         "backprojection, the loss curves, a report and a checkpoint (--resume).",
    params=PARAMS,
    outputs=("volume", "half_map", "model", "volume_series", "chimerax", "fsc", "plot", "report"),
    run=run,
    needs_poses=False,
    citations=(
        "Gupta H, McCann MT, Donati L, Unser M (2021) CryoGAN: a new reconstruction paradigm for single-particle "
        "cryo-EM via deep adversarial learning. IEEE Trans Comput Imaging 7, 759-774.",
        "Gupta H, Phan TH, Yoo J, Unser M (2020) Multi-CryoGAN: reconstruction of continuous conformations in "
        "cryo-EM using generative adversarial networks. ECCV Workshops, 429-444.",
        "Gulrajani I, Ahmed F, Arjovsky M, Dumoulin V, Courville A (2017) Improved training of Wasserstein GANs. "
        "NeurIPS 30.",
    ),
)
