"""``cryohet train-atomic``: an atomic decoder trained on the images (CryoSTAR / AtomVAE class): one atomic model
per latent point."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods._pose_outputs import POSE_PARAMS, pose_options
from cryohet.methods.base import CACHE_PARAMS, Method, Param

#: The particles and where their stacks are (shared with train-deform).
PARTICLE_PARAMS = (
    Param("particles", str, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("datadir", str, "", "Folder to look for the particle stacks in (empty: beside the particle file).",
          expert=True),
)
#: The ELBO's KL weight and the encoder's settings (shared with train-deform and train-gmm).
ENCODER_PARAMS = (
    Param("beta", float, 0.0, "Weight β of the KL term of the ELBO; 0 means 1/zdim (cryoDRGN's default).", min=0.0,
          expert=True),
    Param("enc_layers", int, 3, "Encoder hidden layers.", min=1, max=32, expert=True),
    Param("enc_dim", int, 256, "Encoder layer width.", min=8, max=8192, expert=True),
)
#: The encoder's and the MLP decoder's settings (shared with train-gmm).
NETWORK_PARAMS = (
    *ENCODER_PARAMS,
    Param("dec_layers", int, 3, "Decoder hidden layers.", min=1, max=32, expert=True),
    Param("dec_dim", int, 256, "Decoder layer width.", min=8, max=8192, expert=True),
)
#: Checkpoints, streaming and the prepared-image cache (shared with train-deform).
RUN_PARAMS = (
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoint (written after every "
          "epoch); --epochs is the new total."),
    Param("chunk_images", int, 4096, "Images read from disk per block; memory ~ chunk_images × box² × 4 bytes.",
          min=1, expert=True),
    *CACHE_PARAMS,
    *POSE_PARAMS,
)

PARAMS = (
    *PARTICLE_PARAMS,
    Param("model", str, None, "Reference atomic model (PDB or mmCIF) placed in the particles' map frame (map origin "
          "0, as ChimeraX saves a model fitted in the consensus map): one node per residue (Cα of amino acids, P of "
          "nucleotides), weighted by the residue's heavy atoms.", required=True, input_role="atomic_model"),
    Param("reference_map", str, "", "Optional map of the particles (same box and pixel size): the model is checked "
          "to fit it with the right hand.", input_role="volume"),
    Param("zdim", int, 8, "Latent dimension.", min=1, max=256),
    Param("epochs", int, 30, "Training epochs (passes over the particles).", min=1),
    Param("batch_size", int, 32, "Particles per optimisation step.", min=1),
    Param("lr", float, 1e-3, "Adam learning rate.", min=0.0),
    Param("resolution_A", float, 8.0, "Resolution of the fit, Å: residues are Gaussians of width 0.225 × this and "
          "only frequencies below 1/resolution are compared.", min=0.0),
    Param("elastic_weight", float, 3.0, "Weight of the elastic-network restraint (springs of the reference within "
          "--cutoff_A keep their length), as a multiple of the calibrated weight at which its gradient on the "
          "residues equals the data term's for a random 1 Å RMS displacement (DynaMight's rule); 0: none.",
          min=0.0),
    Param("clash_weight", float, 1.0, "Weight of the clash restraint (non-bonded residues closer than "
          "--clash_distance_A), as a multiple of the same calibrated weight; 0: none.", min=0.0),
    Param("bond_weight", float, 30.0, "Weight of the chain's bonded neighbours (consecutive residues) in the elastic "
          "network, relative to its other springs (CryoSTAR weighs bonds above distances).", min=0.0, expert=True),
    Param("cutoff_A", float, 15.0, "Elastic-network cutoff, Å (cryohet nma's default).", min=0.0, expert=True),
    Param("clash_distance_A", float, 4.0, "Cα–Cα distance below which non-bonded residues clash, Å.", min=0.0,
          expert=True),
    *NETWORK_PARAMS,
    Param("n_models", int, 10, "Atomic models written along the first principal component of z, from its 5th to "
          "its 95th percentile.", min=2),
    Param("n_clusters", int, 10, "k-means clusters of z: one atomic model at each cluster centre (0: none).",
          min=0),
    Param("amp", str, "no", "Mixed precision for the encoder and the decoder's MLP (bfloat16; the Gaussian slices "
          "stay float32): auto, yes, no.", choices=("auto", "yes", "no"), expert=True),
    *RUN_PARAMS,
)


def _plot_terms(path: Path, terms: list[dict[str, float]], weights: list[float]) -> None:
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png

    ep = [h["epoch"] for h in terms]
    fig = Figure(figsize=(11, 3.3), layout="constrained")
    axes = fig.subplots(1, 3)
    titles = ("data (MSE per pixel)", f"elastic network (Å², weight {weights[0]:.3g})",
              f"clash (Å² per residue, weight {weights[1]:.3g})")
    for j, (ax, key) in enumerate(zip(axes, ("data", "elastic", "clash"), strict=True)):
        ax.plot(ep, [h[key] for h in terms], "o-", color=f"C{j}")
        ax.set(xlabel="epoch", title=titles[j])
    save_png(fig, path, dpi=100)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis.latent import kmeans, pc_traversal, pca
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.data.prepare import ImagePreparer, transform_rms
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.atomic_restraints import Restraints, chain_geometry
    from cryohet.inference.atomic_vae import HISTORY_NAME, fit_atomic
    from cryohet.inference.mode_fit import estimate_scale
    from cryohet.inference.trainer import Hooks, TrainOptions
    from cryohet.io.atomic_model import check_model, model_suffix, read_atoms, write_models
    from cryohet.io.particles import load_particles
    from cryohet.methods._latent_outputs import write_latents
    from cryohet.models.atomic_decoder import AtomicDecoder

    out = Path(ctx.out_dir)
    pset = load_particles(params["particles"], params["datadir"] or None)
    atoms = read_atoms(params["model"], "ca")
    check_model(atoms, pset.box, pset.apix, params["resolution_A"], params["reference_map"], ctx.log)
    res_A = params["resolution_A"]
    if not res_A >= 2 * pset.apix:
        raise ValueError(f"--resolution_A {res_A:g} is finer than Nyquist ({2 * pset.apix:g} Å at the particles' "
                         f"{pset.apix:g} Å/pixel)")
    decoder = AtomicDecoder(atoms, pset.box, pset.apix, res_A, params["zdim"], params["dec_layers"],
                            params["dec_dim"], params["seed"])
    restraints = Restraints(atoms, params["cutoff_A"], params["bond_weight"], params["clash_distance_A"])
    lattice = Lattice(pset.box, pset.apix)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(pset.box * pset.apix / res_A))
    reader = pset.reader()
    prep.scale = decoder.data_scale = transform_rms(reader, prep, 1000, params["seed"])
    decoder.log_scale.data.fill_(float(np.log(estimate_scale(decoder, reader, prep, ctx.device,
                                                              seed=params["seed"]))))
    ctx.log.info("%d residues from %s, %d springs within %g Å; %d frequencies below %g Å", len(atoms),
                 params["model"], len(restraints.edges), params["cutoff_A"], len(prep.points), res_A)
    opts = TrainOptions.from_params(params)
    objective, res, terms = fit_atomic(decoder, restraints, (params["elastic_weight"], params["clash_weight"]),
                                       reader, prep, opts, params["enc_layers"], params["enc_dim"], params["beta"],
                                       out, ctx.device, Hooks.of(ctx), params["resume"],
                                       poses=pose_options(params))
    z, d = res.z_mu.astype(np.float64), params["zdim"]
    weights = objective.restraint_weight.tolist()
    decoder.cpu().save(out / "model.safetensors", {"particles": str(Path(params["particles"]).resolve()),
                                                   "reference_model": str(Path(params["model"]).resolve()),
                                                   "restraint_weights": json.dumps(weights),
                                                   "history": json.dumps(res.history)})
    ctx.add("model", "model.safetensors", "atomic decoder (reference residues displaced by an MLP of z)",
            model_type="atomic_decoder", latent_dim=d, box=pset.box, apix=pset.apix)
    write_latents(ctx, pset, {"z.npy": res.z_mu, "z_logvar.npy": res.z_logvar}, z, f"latent means (N, {d})",
                  f"particles with cryohetZ1..{d}", poses=objective.poses, fit_model=decoder,
                  logvar="z_logvar.npy")
    suffix = model_suffix(params["model"], len(atoms))
    pcs = pca(z, 1)
    points, pc_values = pc_traversal(z, pcs, 0, params["n_models"])
    pc_frames = decoder.frames_A(points)
    write_models(out / f"pc1_models{suffix}", atoms, pc_frames)
    geometry = {"pc1": chain_geometry(atoms, pc_frames), "reference": chain_geometry(atoms, atoms.xyz_A[None])}
    if params["n_clusters"]:
        km = kmeans(z, min(params["n_clusters"], len(z)), seed=params["seed"])
        cl_frames = decoder.frames_A(km.centers)
        write_models(out / f"cluster_models{suffix}", atoms, cl_frames)
        geometry["clusters"] = chain_geometry(atoms, cl_frames)
        save_npy(out / "cluster_labels.npy", km.labels.astype(np.int64))
    _plot_terms(out / "restraints.png", terms, weights)
    summary = {"model": decoder.describe(), "n_particles": len(pset), "restraint_weights": {
        "elastic": weights[0], "clash": weights[1], "factors": [params["elastic_weight"], params["clash_weight"]]},
        "pc1_values": pc_values.tolist(), "geometry": geometry, "history": res.history, "terms": terms,
        "epoch_seconds": res.epoch_seconds}
    with atomic_path(out / "atomic_fit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    ctx.log.info("models along PC1: Cα-Cα bonds %.2f ± %.2f Å, %.1f clashes below 3 Å per model",
                 geometry["pc1"]["bond_mean_A"], geometry["pc1"]["bond_std_A"], geometry["pc1"]["clashes_per_model"])
    ctx.add("atomic_model", f"pc1_models{suffix}", f"{params['n_models']} models along the first principal "
            "component of z, 5th to 95th percentile", pc=1)
    if params["n_clusters"]:
        ctx.add("atomic_model", f"cluster_models{suffix}", f"models at the {km.k} k-means cluster centres of z "
                "(labels in cluster_labels.npy)", clusters=km.k, labels="cluster_labels.npy")
    ctx.add("plot", "restraints.png", "data term and each restraint per epoch")
    ctx.add("report", "atomic_fit.json", "restraint weights, chain geometry of the output models (Cα-Cα bonds, "
            "clashes), losses per epoch", history=HISTORY_NAME)


METHOD = Method(
    name="train-atomic",
    order=43,
    title="Train an atomic decoder on the particles: one atomic model per latent point (CryoSTAR, AtomVAE)",
    help="Trains an encoder of each particle image to q(z | image) and a decoder of z into displacements of the "
         "residues of a reference atomic model (one Gaussian per residue, weighted by its heavy atoms, projected "
         "analytically at the particle's pose with its CTF), by maximising the evidence lower bound with two "
         "restraints: an elastic network (the reference's springs within --cutoff_A keep their length, the chain's "
         "bonds weighted more) and a clash term (non-bonded residues kept --clash_distance_A apart, found with a "
         "neighbour list). Their weights are calibrated against the data term before training. Writes the model, "
         "the latent means (rows in particle-file order), the particles STAR with cryohetZ1..d, atomic models along "
         "the first principal component of z and at k-means cluster centres (multi-model PDB, or mmCIF for an "
         "mmCIF input), a plot of the data term and restraints per epoch, and a JSON report with the chain "
         "geometry of the models. A checkpoint is written after every epoch: --resume yes continues.",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "atomic_model", "plot", "report"),
    run=run,
    citations=("Li, Zhang, Yu, Wang & Gu (2024) CryoSTAR: leveraging structural priors and constraints for cryo-EM "
               "heterogeneous reconstruction. Nature Methods 21, 2318-2326.",
               "Schwab, Kimanius, Burt, Dendooven & Scheres (2024) DynaMight: estimating molecular motions with "
               "improved reconstruction from cryo-EM images. Nature Methods 21, 1855-1862."),
)
