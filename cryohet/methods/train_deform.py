"""``cryohet train-deform``: a canonical map deformed per particle by a Zernike3D field (flexutils) or a neural flow
field (3DFlex class), the canonical map refined jointly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods._pose_outputs import pose_options
from cryohet.methods.base import Method, Param
from cryohet.methods.train_atomic import ENCODER_PARAMS, PARTICLE_PARAMS, RUN_PARAMS

PARAMS = (
    *PARTICLE_PARAMS,
    Param("consensus_map", str, None, "Consensus map of the particles (same box and pixel size), e.g. a cryohet "
          "reconstruct output: the canonical map starts as its fit.", required=True, input_role="volume"),
    Param("mask", str, "", "Optional mask of the particle (same box and pixel size; voxels above 0.5 kept). Empty: "
          "the consensus low-passed at --resolution_A above --threshold, dilated by half the resolution.",
          input_role="mask"),
    Param("threshold", float, 0.0, "Density threshold of the low-passed consensus for the automatic mask, map "
          "units; 0: 10 % of its maximum.", min=0.0, expert=True),
    Param("field", str, "zernike", "Deformation field: zernike (Zernike3D polynomials in a sphere, coefficients a "
          "function of z; flexutils) or flow (an MLP of the position's Fourier features and z; 3DFlex class).",
          choices=("zernike", "flow")),
    Param("resolution_A", float, 8.0, "Resolution of the fit, Å: the canonical map's points are Gaussians of width "
          "0.225 × this and only frequencies below 1/resolution are compared.", min=0.0),
    Param("grid_A", float, 0.0, "Spacing of the canonical map's points, Å (0: resolution / 2, the band limit's "
          "sampling). Their number grows as 1/grid³.", min=0.0),
    Param("radius_A", float, 0.0, "Radius of the Zernike3D sphere and the flow field's coordinate scale, Å, about "
          "the box centre (0: the farthest canonical point plus one grid step). Points outside do not move under "
          "zernike.", min=0.0),
    Param("l1", int, 3, "Zernike3D radial degree L1 (flexutils' default 3).", min=0, max=15),
    Param("l2", int, 2, "Zernike3D harmonic degree L2 (flexutils' default 2; at most L1).", min=0, max=15),
    Param("zernike_dim", int, 0, "Width of the MLP from z to the Zernike3D coefficients (0: a linear map).", min=0,
          max=4096, expert=True),
    Param("flow_freq", int, 4, "Octaves of the flow field's positional encoding of the coordinates.", min=0, max=12,
          expert=True),
    Param("flow_dim", int, 64, "Flow field MLP width.", min=8, max=4096, expert=True),
    Param("flow_layers", int, 2, "Flow field MLP hidden layers.", min=1, max=16, expert=True),
    Param("zdim", int, 8, "Latent dimension.", min=1, max=256),
    Param("epochs", int, 30, "Training epochs (passes over the particles).", min=1),
    Param("batch_size", int, 32, "Particles per optimisation step.", min=1),
    Param("lr", float, 1e-3, "Adam learning rate.", min=0.0),
    Param("rigidity_weight", float, 1.0, "Weight of the rigidity term (‖JᵀJ − I‖² of the deformation's local "
          "Jacobian: neighbourhoods move as rigid bodies), as a multiple of the calibrated weight at which its "
          "gradient equals the data term's for a random 1 Å RMS Zernike3D deformation (DynaMight's rule); 0: none.",
          min=0.0),
    Param("drift_weight", float, 0.1, "Weight of the canonical amplitudes' drift from their fit to the consensus "
          "(‖w − w0‖² / ‖w0‖²), as a multiple of the starting data term; 0: none.", min=0.0),
    *ENCODER_PARAMS,
    Param("n_maps", int, 10, "Maps written along the first principal component of z, from its 5th to its 95th "
          "percentile.", min=2),
    Param("n_clusters", int, 10, "k-means clusters of z: one map at each cluster centre (0: none).", min=0),
    Param("amp", str, "no", "Mixed precision for the encoder and the MLPs (bfloat16; the slices stay float32): "
          "auto, yes, no.", choices=("auto", "yes", "no"), expert=True),
    *RUN_PARAMS,
)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.data.prepare import ImagePreparer, transform_rms
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.deform_vae import fit_deform
    from cryohet.inference.mode_fit import estimate_scale
    from cryohet.inference.trainer import Hooks, TrainOptions
    from cryohet.io.mrc import read_map_like, read_mask
    from cryohet.io.particles import load_particles
    from cryohet.methods._deform_outputs import write_outputs
    from cryohet.models.canonical_map import canonical_model_points
    from cryohet.models.deformation_fields import FlowField, ZernikeField
    from cryohet.models.deformed_map import DeformedMap

    out = Path(ctx.out_dir)
    pset = load_particles(params["particles"], params["datadir"] or None)
    res_A = params["resolution_A"]
    if not res_A >= 2 * pset.apix:
        raise ValueError(f"--resolution_A {res_A:g} is finer than Nyquist ({2 * pset.apix:g} Å at the particles' "
                         f"{pset.apix:g} Å/pixel)")
    if params["l2"] > params["l1"]:
        raise ValueError(f"--l2 {params['l2']} exceeds --l1 {params['l1']}: no Zernike3D functions of that degree")
    consensus = read_map_like(params["consensus_map"], pset.box, pset.apix, "--consensus_map")
    mask = read_mask(params["mask"], pset.box, pset.apix) if params["mask"] else None
    lattice = Lattice(pset.box, pset.apix)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(pset.box * pset.apix / res_A))
    grid_A = params["grid_A"] or res_A / 2
    canon = canonical_model_points(consensus, pset.apix, res_A, grid_A, mask, params["threshold"],
                                   params["consensus_map"], params["mask"] or None, params["batch_size"],
                                   len(prep.points), params["field"], params["flow_dim"], params["flow_layers"],
                                   ctx.device)
    ctx.log.info("canonical map: %d points on a %.3g Å grid; least-squares fit of the consensus below %g Å: "
                 "relative residual %.4f after %d iterations", len(canon.atoms), grid_A, res_A, canon.fit.residual,
                 canon.fit.iterations)
    radius = params["radius_A"] or canon.radius_A
    if params["field"] == "zernike" and radius < canon.radius_A - grid_A:
        ctx.log.warning("--radius_A %g Å: canonical points up to %.1f Å from the box centre lie outside the "
                        "Zernike3D sphere and will not move", radius, canon.radius_A - grid_A)
    common = dict(zdim=params["zdim"], radius_A=radius, seed=params["seed"])
    field = (ZernikeField(l1=params["l1"], l2=params["l2"], hidden=params["zernike_dim"], **common)
             if params["field"] == "zernike" else
             FlowField(n_freq=params["flow_freq"], hidden=params["flow_dim"], layers=params["flow_layers"], **common))
    decoder = DeformedMap(canon.atoms, pset.box, pset.apix, res_A, grid_A, field)
    reader = pset.reader()
    prep.scale = decoder.data_scale = transform_rms(reader, prep, 1000, params["seed"])
    decoder.log_scale.data.fill_(float(np.log(estimate_scale(decoder, reader, prep, ctx.device,
                                                              seed=params["seed"]))))
    opts = TrainOptions.from_params(params)
    objective, res, terms = fit_deform(decoder, (params["rigidity_weight"], params["drift_weight"]), reader, prep,
                                       opts, params["enc_layers"], params["enc_dim"], params["beta"], out, ctx.device,
                                       Hooks.of(ctx), params["resume"], poses=pose_options(params))
    decoder.cpu().save(out / "model.safetensors", {"particles": str(Path(params["particles"]).resolve()),
                                                   "consensus_map": str(Path(params["consensus_map"]).resolve()),
                                                   "history": json.dumps(res.history)})
    ctx.add("model", "model.safetensors", f"canonical map deformed by a {params['field']} field of z",
            model_type="deformed_map", latent_dim=params["zdim"], box=pset.box, apix=pset.apix)
    write_outputs(ctx, params, pset, decoder, objective, res, terms, canon, consensus)


METHOD = Method(
    name="train-deform",
    order=44,
    title="Train a deformed canonical map on the particles: Zernike3D or neural flow fields (flexutils, 3DFlex)",
    help="Represents the consensus map by Gaussians on a regular grid inside its mask (amplitudes fitted to it by "
         "least squares) and trains an encoder of each particle image to q(z | image) with a displacement field "
         "of z that moves these points: Zernike3D polynomials in a sphere (degrees L1, L2 as Scipion flexutils) "
         "or a neural flow field of the coordinates and z (3DFlex class). The points are projected analytically "
         "at each particle's pose with its CTF; the canonical amplitudes are refined jointly; a rigidity term "
         "(local Jacobian close to a rotation) and an amplitude-drift term are weighted by a calibration against "
         "the data term. Writes the model, the latent means (rows in particle-file order), the particles STAR "
         "with cryohetZ1..d, maps along the first principal component of z and at k-means cluster centres, the "
         "refined canonical map, the displacements of the canonical points along the first principal component "
         "(.npy and a multi-model PDB of the points, with a ChimeraX script), latent plots and a JSON report. A "
         "checkpoint is written after every epoch: --resume yes continues.",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "volume_series", "volume", "mask", "atomic_model", "chimerax",
             "plot", "report"),
    run=run,
    citations=("Herreros, Lederman, Krieger, Jiménez-Moreno, Martínez, Hanson, Carazo & Sorzano (2021) Approximating "
               "deformation fields for the analysis of continuous heterogeneity of biological macromolecules by 3D "
               "Zernike polynomials. IUCrJ 8, 992-1005.",
               "Punjani & Fleet (2023) 3DFlex: determining structure and motion of flexible proteins from cryo-EM. "
               "Nature Methods 20, 860-870."),
)
