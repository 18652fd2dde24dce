"""``cryohet multibody``: multi-body refinement (RELION's), each rigid body's rotation and translation per particle."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import DATADIR, Method, Param

PARAMS = (
    Param("particles", Path, None, "Particles with their consensus poses and CTF: RELION STAR (3.0/3.1/5) or "
          "cryoSPARC .cs.", required=True, input_role="particles"),
    Param("map", Path, None, "Consensus map (MRC) of these particles: their box and pixel size.", required=True,
          input_role="volume"),
    Param("bodies", str, None, "The rigid bodies: a RELION bodies STAR (rlnBodyMaskName, rlnBodyRotateRelativeTo, "
          "rlnBodySigmaAngles, rlnBodySigmaOffsetAngst; mask paths relative to the STAR's folder or the current "
          "folder) or a comma-separated list of mask files (values 0-1, the map's box and pixel size). Bodies whose "
          "masks overlap need rlnBodyRotateRelativeTo.", required=True),
    Param("iterations", int, 3, "Iterations: each subtracts the other bodies, searches every body's pose locally "
          "and reconstructs the bodies.", min=1, max=100),
    Param("resolution_A", float, 0.0, "Score the images up to this resolution, Å (they are Fourier-cropped to the "
          "box it needs, which also makes the run faster). 0: the images' Nyquist.", min=0.0),
    Param("max_angle_deg", float, 10.0, "Largest change of a body's rotation per iteration in the local search, "
          "degrees.", min=0.1, max=90.0),
    Param("max_shift_A", float, 3.0, "Largest change of a body's in-plane shift per iteration, Å.", min=0.0),
    Param("search_rounds", int, 4, "Rounds of the local search per body and iteration: each scores a 3×3×3 grid of "
          "rotations by a 3×3 grid of shifts around the best so far, the grid halving each round (the first spans "
          "half of --max_angle_deg and --max_shift_A).", min=1, max=10, expert=True),
    Param("sigma_angles_deg", float, 10.0, "With a list of masks: width of the Gaussian prior on each body's "
          "rotation away from the consensus, degrees (a bodies STAR gives its own, rlnBodySigmaAngles). 0: no "
          "prior.", min=0.0, expert=True),
    Param("sigma_offset_A", float, 2.0, "With a list of masks: width of the Gaussian prior on each body's shift, Å "
          "(a bodies STAR gives its own, rlnBodySigmaOffsetAngst). 0: no prior.", min=0.0, expert=True),
    Param("learn_priors", bool, True, "Learn the widths of each body's priors from the data after every iteration "
          "(empirical Bayes: the widths under which the per-particle estimates are most probable), starting from "
          "the given ones; no: keep them fixed, as RELION does. Weakly determined bodies are then pulled towards "
          "the consensus pose as much as their data warrant.", expert=True),
    DATADIR,
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (checkpoint.safetensors, "
          "written after every iteration; the one before is kept as checkpoint.prev.safetensors); --iterations is the "
          "new total. The other settings must be the same."),
)

#: Largest change of a body's resolution in the last iteration, in Fourier shells, that counts as converged.
CONVERGED_SHELLS = 1.0


def _plot_motions(path: Path, motions: np.ndarray, rotation_deg: np.ndarray) -> Path:
    """Histograms of each body's rotation angle away from the consensus and of its translation's length."""
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    nb = rotation_deg.shape[1]
    fig = Figure(figsize=(9, 3.2 * nb), layout="constrained")
    axes = fig.subplots(nb, 2, squeeze=False)
    for b in range(nb):
        axes[b, 0].hist(rotation_deg[:, b], bins=60, color="C0")
        axes[b, 0].set(xlabel=f"body {b + 1}: rotation away from the consensus (deg)", ylabel="particles")
        axes[b, 1].hist(np.linalg.norm(motions[:, 6 * b + 3:6 * b + 6], axis=1), bins=60, color="C1")
        axes[b, 1].set(xlabel=f"body {b + 1}: translation (Å)", ylabel="particles")
    return save_png(fig, path, dpi=90)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.atomic import save_npy
    from cryohet.geometry.euler import euler_to_matrix
    from cryohet.inference.bodies import read_bodies
    from cryohet.inference.multibody import absolute_poses, body_motions, refine_bodies
    from cryohet.io.mrc import read_map_like, write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.reconstruct.homogeneous import particle_halves
    from cryohet.simulate.bodies import write_bodies_star

    # every input is read and checked before anything is written
    pset = load_particles(params["particles"], params["datadir"] or None)
    consensus = read_map_like(params["map"], pset.box, pset.apix, "--map (the consensus map)")
    bodies = read_bodies(params["bodies"], pset.box, pset.apix, params["sigma_angles_deg"],
                         params["sigma_offset_A"])
    nb = len(bodies)
    half = particle_halves(pset, ctx.seed)
    ctx.log.info("%d particles, box %d at %.3f Å/px; %d bodies refined in the order %s; half-sets of %d and %d",
                 len(pset), pset.box, pset.apix, nb, " ".join(str(b + 1) for b in bodies.order),
                 (half == 1).sum(), (half == 2).sum())
    for b, body in enumerate(bodies.bodies):
        rel = "the box centre" if body.relative_to is None else f"body {body.relative_to + 1}"
        ctx.log.info("body %d: %s, centre (%.1f, %.1f, %.1f) Å, rotates relative to %s, priors %.3g deg / %.3g Å",
                     b + 1, body.source, *body.centre_A, rel, body.sigma_angles_deg, body.sigma_offset_A)

    fit = refine_bodies(pset, consensus, bodies, half, iterations=params["iterations"],
                        resolution_A=params["resolution_A"], max_angle_deg=params["max_angle_deg"],
                        max_shift_A=params["max_shift_A"], n_rounds=params["search_rounds"],
                        learn_priors=params["learn_priors"],
                        checkpoint=Path(ctx.out_dir) / "checkpoint.safetensors", resume=params["resume"],
                        batch_size=params["batch_size"], device=ctx.device,
                        log=ctx.log, progress=ctx.progress)
    # converged when no body's resolution moved by a Fourier shell in the last iteration (the per-particle poses
    # keep moving by their noise from one iteration to the next); a single iteration counts from shell 0
    shells = [pset.box * pset.apix / r for r in fit.history[-1]["resolution_A"]]
    before = [pset.box * pset.apix / r for r in fit.history[-2]["resolution_A"]] if len(fit.history) > 1 else \
        [0.0] * nb
    change = max(abs(a - b) for a, b in zip(shells, before))
    ctx.report_convergence("multi-body refinement (change of the body resolutions in the last iteration, Fourier "
                           "shells)", change <= CONVERGED_SHELLS, change, CONVERGED_SHELLS, len(fit.history))

    out = Path(ctx.out_dir)
    apix, box = fit.apix, pset.box
    curves = {}
    for b, body in enumerate(bodies.bodies):
        stem = f"body{b + 1:03d}"
        write_map(out / f"{stem}.mrc", fit.maps[b].cpu().numpy(), apix)
        for j in (0, 1):
            write_map(out / f"{stem}_half{j + 1}.mrc", fit.half_maps[b][j].cpu().numpy(), apix)
        write_map(out / f"{stem}_mask.mrc", body.mask, apix)
        write_fsc_star(out / f"{stem}_fsc.star", box, apix, fit.fsc[b], fit.fsc_masked[b])
        res = fit.resolution_A(b)
        curves[f"body {b + 1}, masked"] = fit.fsc_masked[b]
        ctx.add("volume", f"{stem}.mrc", f"body {b + 1}", body=b + 1, apix=apix, resolution_A=res)
        for j in (0, 1):
            ctx.add("half_map", f"{stem}_half{j + 1}.mrc", f"body {b + 1} half-map {j + 1}", body=b + 1, apix=apix)
        ctx.add("mask", f"{stem}_mask.mrc", f"body {b + 1} mask", body=b + 1,
                centre_A=body.centre_A.round(6).tolist(), frame=body.frame.round(9).tolist(),
                relative_to=-1 if body.relative_to is None else body.relative_to + 1,
                sigma_angles_deg=float(fit.sigma_angles_deg[b]), sigma_offset_A=float(fit.sigma_offset_A[b]),
                source=body.source)
        ctx.add("fsc", f"{stem}_fsc.star", f"body {b + 1} half-map FSC (masked and unmasked)", body=b + 1,
                resolution_A=res)
        ctx.log.info("body %d: %.2f Å at FSC 0.143 inside its mask (%.2f Å unmasked)", b + 1, res,
                     fit.resolution_A(b, masked=False))
    write_bodies_star(out / "bodies.star", [f"body{b + 1:03d}_mask.mrc" for b in range(nb)],
                      [-1 if body.relative_to is None else body.relative_to + 1 for body in bodies.bodies],
                      fit.sigma_angles_deg.round(3).tolist(), fit.sigma_offset_A.round(3).tolist())
    plot_fsc(out / "fsc_bodies.png", box, apix, curves)
    ctx.add("plot", "fsc_bodies.png", "half-map FSC of each body inside its mask")

    A = euler_to_matrix(np.asarray(pset.euler_deg, dtype=np.float64))
    euler, origin = absolute_poses(A, np.asarray(pset.shift_A, dtype=np.float64), fit.poses, bodies.centres_A)
    columns: dict[str, np.ndarray] = {"rlnRandomSubset": half}
    for b in range(nb):
        for k, name in enumerate(("AngleRot", "AngleTilt", "AnglePsi")):
            columns[f"cryohetBody{b + 1}{name}"] = euler[:, b, k]
        columns[f"cryohetBody{b + 1}OriginXAngst"] = origin[:, b, 0]
        columns[f"cryohetBody{b + 1}OriginYAngst"] = origin[:, b, 1]
    write_particles_star(out / "particles.star", pset, extra_columns=columns)
    ctx.add("particles_star", "particles.star", "input particles with each body's pose (cryohetBody<b>Angle*, "
            "cryohetBody<b>Origin*Angst: RELION poses of the consensus map times the body's mask)", n=len(pset),
            bodies=nb)
    motions = body_motions(A, fit.poses, bodies)
    save_npy(out / "body_motions.npy", motions)
    ctx.add("latents", "body_motions.npy", "body motions relative to the consensus (N × 6 per body: rot, tilt, psi "
            "in the body's frame, deg, 0 90 0 = no motion; x, y, z, Å)", content="body_motions", dim=6 * nb,
            bodies=nb, columns=["rot_deg", "tilt_deg", "psi_deg", "x_A", "y_A", "z_A"])
    angle = np.degrees(np.arccos(np.clip((np.trace(fit.poses.rotations, axis1=-2, axis2=-1) - 1) / 2, -1, 1)))
    _plot_motions(out / "body_motions.png", motions, angle)
    ctx.add("plot", "body_motions.png", "distribution of each body's rotation and translation")
    for b in range(nb):
        ctx.log.info("body %d: median rotation %.2f deg, median translation %.2f Å away from the consensus", b + 1,
                     float(np.median(angle[:, b])), float(np.median(np.linalg.norm(motions[:, 6 * b + 3:6 * b + 6],
                                                                                    axis=1))))


METHOD = Method(
    name="multibody",
    order=35,
    title="Multi-body refinement",
    help="RELION's multi-body refinement: from consensus poses, a consensus map and one soft mask per rigid body "
         "(a RELION bodies STAR or a list of masks), each body's rotation about its centre and its translation are "
         "refined per particle by a local search against the consensus (then the body's own half-map) times its "
         "mask, on images from which the other bodies' projections are subtracted; bodies are reconstructed from "
         "the two half-sets with FSC. Writes bodyNNN.mrc with half-maps, masks and FSC, particles.star (each body's "
         "pose in cryohetBody<b>* columns), body_motions.npy (6 numbers per body per particle, as "
         "relion_flex_analyse) and plots; analyse it with 'cryohet flex-analyse'.",
    params=PARAMS,
    outputs=("volume", "half_map", "mask", "fsc", "plot", "particles_star", "latents"),
    run=run,
    citations=("Nakane T, Kimanius D, Lindahl E, Scheres SHW (2018) Characterisation of molecular motions in "
               "cryo-EM single-particle data by multi-body refinement in RELION. eLife 7:e36861.",),
)
