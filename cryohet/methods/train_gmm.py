"""``cryohet train-gmm``: Gaussian pseudo-atoms of a consensus map moved by a decoder of z (e2gmm, DynaMight), two
half-set models for each particle's deformation error."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.errors import InputError
from cryohet.methods._pose_outputs import POSE_PARAMS, pose_options
from cryohet.methods.base import CACHE_PARAMS, DATADIR, Method, Param
from cryohet.methods.train_atomic import NETWORK_PARAMS

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF: RELION STAR (3.0, 3.1+) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("consensus_map", Path, None, "Consensus map of the particles (a cryohet reconstruct output or your own; "
          "same box and pixel size as the particles): the Gaussians are placed on it and fitted to it.",
          required=True, input_role="volume"),
    Param("mask", Path, None, "Optional mask (MRC, same box and pixel size): the Gaussians fill the consensus map's "
          "positive density inside it (default: the map above --threshold).", input_role="mask"),
    Param("threshold", float, 0.0, "Density threshold of the consensus map that bounds the Gaussians (map units); "
          "0: automatic (the larger of 5 σ of the map's noise outside the particle and 5 % of its 99.9th "
          "percentile)."),
    Param("model", Path, None, "Optional atomic model (PDB/mmCIF) in the map frame (map origin 0): one Gaussian per "
          "residue (Cα or P) instead of pseudo-atoms of the map.", input_role="atomic_model"),
    DATADIR,
    Param("n_gaussians", int, 0, "Number of Gaussian pseudo-atoms; 0: one per (resolution_A/2)³ Å³ of the support "
          "(mask, or map above the threshold), 50 to 30000.", min=0),
    Param("resolution_A", float, 8.0, "Resolution of the fit, Å: Gaussians of width 0.225 × this, frequencies "
          "below 1/resolution compared.", min=0.0),
    Param("zdim", int, 8, "Latent dimension.", min=1, max=256),
    Param("epochs", int, 30, "Training epochs of each model (passes over its particles).", min=1),
    Param("batch_size", int, 32, "Particles per optimisation step.", min=1),
    Param("lr", float, 3e-3, "Adam learning rate.", min=0.0),
    Param("warmup_epochs", float, 3.0, "Epochs over which the KL term and the restraints are ramped up from 0 "
          "(linearly, per step): z becomes informative before the prior and the restraints pull on it.", min=0.0,
          expert=True),
    Param("halfsets", bool, True, "Also train one model on each half of the particles (rlnRandomSubset, else a "
          "seeded random split) and give each particle its deformation error: the RMS over the Gaussians of the "
          "difference of the displacements the two half models give it (Å)."),
    Param("elastic_weight", float, 1.0, "Weight of the elastic network (neighbours within --cutoff_factor × the "
          "spacing keep their distance), as a multiple of the weight at which its gradient on the Gaussians equals "
          "the data term's for a random 1 Å RMS displacement (DynaMight's rule); 0: none.", min=0.0),
    Param("clash_weight", float, 1.0, "Weight of the clash term (Gaussians closer than --clash_fraction × the "
          "spacing), as a multiple of the same calibrated weight; 0: none.", min=0.0),
    Param("cutoff_factor", float, 3.0, "Elastic-network cutoff as a multiple of the Gaussians' spacing (median "
          "nearest-neighbour distance, Å).", min=1.0, expert=True),
    Param("clash_fraction", float, 0.6, "Distance below which Gaussians clash, as a fraction of their spacing.",
          min=0.0, max=2.0, expert=True),
    Param("bond_weight", float, 30.0, "With --model: weight of the chain's bonded neighbours in the elastic network "
          "relative to its other springs.", min=0.0, expert=True),
    Param("beta", float, 0.02, "Weight β of the KL term of the ELBO (0: 1/zdim, cryoDRGN's default). The default "
          "0.02 is lower than train-vae's: at SNR 0.1 (hinge, 1000 particles) 1/zdim left the Gaussians' latent "
          "unused (posterior collapse, KL 1e-5 nats after 30 epochs) where 0.02 found the motion in 12.",
          min=0.0, expert=True),
    *(p for p in NETWORK_PARAMS if p.name != "beta"),
    Param("n_maps", int, 10, "Maps and pseudo-atom models along each of the first two principal components of z "
          "(5th to 95th percentile).", min=2),
    Param("n_clusters", int, 10, "k-means clusters of z: a map and a model at each centre (0: none).", min=0),
    Param("amp", str, "no", "Mixed precision for the encoder and the decoder's MLP (bfloat16; the Gaussian slices "
          "stay float32): auto, yes, no.", choices=("auto", "yes", "no"), expert=True),
    Param("resume", bool, False, "Continue the run in this output folder from its checkpoints (one per model, "
          "written after every epoch); --epochs is the new total. The half-set models start from the encoder of "
          "the model of all particles as it was when they began."),
    Param("chunk_images", int, 4096, "Images read from disk per block; memory ~ chunk_images × box² × 4 bytes.",
          min=1, expert=True),
    *CACHE_PARAMS,
    *POSE_PARAMS,
)

FIT_NAME = "gmm_fit.json"
#: A mask must hold at least this fraction of the consensus map's density above its automatic threshold.
MIN_MASK_FRACTION = 0.2
#: KL (nats per particle) at the last epoch below which a model is taken as not using its latent space.
COLLAPSED_KL = 0.05
#: Fraction of the device's free memory a training step may plan to use.
MEMORY_FRACTION = 0.8


@dataclass
class GaussianPlan:
    """Where the Gaussians go: the ``support`` (bool, z, y, x) above ``threshold``, the map ``target`` their
    amplitudes are fitted to, their number and how it was chosen, and the memory of a training step."""

    threshold: float
    support: np.ndarray
    target: np.ndarray
    n_gaussians: int
    rule: str
    step_bytes: int
    free_bytes: int

    def describe(self) -> str:
        return (f"{self.n_gaussians} Gaussians ({self.rule}), about {self.step_bytes / 1e9:.2f} GB per training "
                f"step of {self.free_bytes / 1e9:.1f} GB free")

    def describe_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "support_voxels": int(self.support.sum()),
                "n_gaussians": self.n_gaussians, "rule": self.rule, "step_bytes": self.step_bytes,
                "free_bytes": self.free_bytes}


def plan_gaussians(consensus: np.ndarray, cmap_path: Path, mask: np.ndarray | None, mask_path: Path | None,
                   threshold: float, n_asked: int, apix: float, resolution_A: float, batch: int, n_points: int,
                   cutoff_factor: float, device: Any, n_residues: int | None) -> GaussianPlan:
    """The support, fit target and number of the Gaussians, checked before anything is allocated: InputError
    naming the mask when it holds too little of the consensus map's density, naming the map when nothing lies
    above the threshold or when the Gaussians' training step does not fit the device's free memory (with the
    largest number that does)."""
    from scipy.ndimage import binary_dilation

    from cryohet.device import free_memory_bytes, refuse_unless_fits
    from cryohet.models.gaussian_mixture import (
        MIN_GAUSSIANS,
        batch_bytes,
        gaussian_count,
        max_gaussians,
        support_threshold,
    )

    auto = support_threshold(consensus, apix)
    thr = threshold if threshold > 0 else auto
    dense = consensus > auto
    if mask is not None:
        inside = float((consensus * dense * (mask >= 0.5)).sum()) / max(float((consensus * dense).sum()), 1e-30)
        if inside < MIN_MASK_FRACTION:
            raise InputError(mask_path, f"the mask holds {100 * inside:.1f} % of the density of {cmap_path} above "
                                        f"its automatic threshold {auto:.4g} (at least {100 * MIN_MASK_FRACTION:g} "
                                        "% needed): it excludes the particle; check that mask and map belong "
                                        "together")
        support = (mask >= 0.5) & (consensus > (threshold if threshold > 0 else 0.0))
        thr = threshold if threshold > 0 else 0.0
        target = consensus * mask
    else:
        support = consensus > thr
        grow = max(1, int(np.ceil(resolution_A / apix)))
        target = consensus * binary_dilation(support, iterations=grow)
    if support.sum() < MIN_GAUSSIANS:
        raise InputError(mask_path if mask is not None else cmap_path,
                         f"{int(support.sum())} voxels of {cmap_path} lie above the threshold {thr:.4g}"
                         + (" inside the mask" if mask is not None else "")
                         + f" (map values {consensus.min():.4g} to {consensus.max():.4g}): lower --threshold")
    if n_residues is not None:
        n, rule = n_residues, "one per residue of --model"
    elif n_asked:
        n, rule = n_asked, "--n_gaussians"
    else:
        n = gaussian_count(int(support.sum()), apix, resolution_A)
        rule = f"one per ({resolution_A / 2:g} Å)³ of the support"
    need = batch_bytes(n, n_points, batch, cutoff_factor)
    refuse_unless_fits(need, device, MEMORY_FRACTION, cmap_path,
                       f"{n} Gaussians ({rule}) in a training step of {batch} particles ({n_points} frequencies)",
                       lambda usable: f"{max_gaussians(usable, n_points, batch, cutoff_factor)} Gaussians",
                       "ask for fewer (--n_gaussians), a smaller --batch_size or a coarser --resolution_A")
    return GaussianPlan(float(thr), support, target.astype(np.float32), n, rule, need,
                        free_memory_bytes(device))


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.data.prepare import ImagePreparer, transform_rms
    from cryohet.geometry.lattice import Lattice
    from cryohet.inference.atomic_restraints import Restraints, bonded_pairs
    from cryohet.inference.atomic_vae import fit_atomic
    from cryohet.inference.mode_fit import estimate_scale
    from cryohet.inference.trainer import Hooks, TrainOptions
    from cryohet.io.atomic_model import box_centre_A, check_model, read_atoms
    from cryohet.io.mrc import read_map_like, read_mask
    from cryohet.io.particles import load_particles
    from cryohet.methods._gmm_outputs import consensus_fit, write_gmm_outputs
    from cryohet.methods._latent_outputs import write_latents
    from cryohet.models.gaussian_mixture import GaussianMixture, fit_amplitudes, spacing_A
    from cryohet.models.pseudo_atoms import place_pseudo_atoms

    out = Path(ctx.out_dir)
    pset = load_particles(params["particles"], params["datadir"])
    res_A = params["resolution_A"]
    if not res_A >= 2 * pset.apix:
        raise ValueError(f"--resolution_A {res_A:g} is finer than Nyquist ({2 * pset.apix:g} Å at the particles' "
                         f"{pset.apix:g} Å/pixel)")
    cmap_path = params["consensus_map"]
    consensus = read_map_like(cmap_path, pset.box, pset.apix, "--consensus_map")
    mask = read_mask(params["mask"], pset.box, pset.apix) if params["mask"] is not None else None
    lattice = Lattice(pset.box, pset.apix)
    points = lattice.half_plane(pset.box * pset.apix / res_A)
    atoms = None
    if params["model"] is not None:
        atoms = read_atoms(params["model"], "ca")
        check_model(atoms, pset.box, pset.apix, res_A, cmap_path, ctx.log)
        bonds = bonded_pairs(atoms)
    plan = plan_gaussians(consensus, cmap_path, mask, params["mask"], params["threshold"], params["n_gaussians"],
                          pset.apix, res_A, params["batch_size"], len(points), params["cutoff_factor"], ctx.device,
                          None if atoms is None else len(atoms))
    ctx.log.info("consensus %s: threshold %.4g, support %d voxels; %s", cmap_path, plan.threshold,
                 int(plan.support.sum()), plan.describe())
    if atoms is None:
        placed = place_pseudo_atoms(np.where(plan.support, consensus, -np.inf), pset.apix, plan.threshold,
                                    plan.n_gaussians, cmap_path, seed=params["seed"], device=ctx.device)
        ctx.report_convergence("pseudo-atom k-means", placed.converged, placed.last_move_A, placed.tol_A,
                               placed.iterations)
        atoms, bonds = placed.atoms, np.zeros((0, 2), np.int64)
    spacing = spacing_A(atoms.xyz_A)
    centre = box_centre_A(pset.box, pset.apix)
    amps, fitted, amp_fit = fit_amplitudes(atoms.xyz_A - centre, plan.target, pset.apix, res_A, ctx.device)
    ctx.report_convergence("amplitudes fitted to the consensus map", amp_fit["converged"], amp_fit["last_change"],
                           amp_fit["tol"], amp_fit["iterations"])
    if not amps.max() > 0:
        raise ValueError(f"no Gaussian amplitude is positive after the fit to {cmap_path}")
    mean_amp = float(amps[amps > 0].mean())
    atoms.weight = amps / mean_amp  # amplitudes near 1 (the learning rate's scale); the global scale absorbs it
    fit_report = {**consensus_fit(fitted, plan.target, consensus, pset.apix, res_A), **amp_fit}
    ctx.log.info("%d Gaussians (spacing %.2f Å) fitted to the consensus map: correlation %.4f, mean FSC to "
                 "%g Å %.3f", len(atoms), spacing, fit_report["correlation"], res_A,
                 fit_report["fsc_mean_to_resolution"])

    prep = ImagePreparer(pset, lattice, points)
    reader = pset.reader()
    data_scale = transform_rms(reader, prep, 1000, params["seed"])
    restraints = Restraints(atoms, params["cutoff_factor"] * spacing, params["bond_weight"],
                            params["clash_fraction"] * spacing, bonds)
    ctx.log.info("restraints: %d springs within %.2f Å, clashes below %.2f Å", len(restraints.edges),
                 restraints.cutoff_A, restraints.min_distance_A)
    opts = TrainOptions.from_params(params)
    hooks = Hooks.of(ctx)
    factors = (params["elastic_weight"], params["clash_weight"])
    latent_kl: dict[str, float] = {}

    def make_model(seed: int, sub_reader: Any, sub_prep: Any) -> GaussianMixture:
        model = GaussianMixture(atoms, pset.box, pset.apix, res_A, params["zdim"], params["dec_layers"],
                                params["dec_dim"], seed, spacing, data_scale=data_scale)
        sub_prep.scale = data_scale
        model.log_scale.data.fill_(float(np.log(estimate_scale(model, sub_reader, sub_prep, ctx.device,
                                                               seed=params["seed"]))))
        return model

    def train(model: GaussianMixture, sub_reader: Any, sub_prep: Any, folder: Path,
              encoder: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
        folder.mkdir(exist_ok=True)
        fitted = fit_atomic(model, restraints, factors, sub_reader, sub_prep, opts, params["enc_layers"],
                            params["enc_dim"], params["beta"], folder, ctx.device, hooks, params["resume"],
                            params["warmup_epochs"], encoder, pose_options(params))
        kl = fitted[1].history[-1]["kld"]
        latent_kl[folder.name if folder != out else "all"] = kl
        if kl < COLLAPSED_KL:
            ctx.log.warning("the model in %s does not use its latent space (KL %.2g nats at the last epoch: "
                            "posterior collapse); its displacements say nothing of the particles: train longer "
                            "(--epochs), with more particles or a smaller --beta", folder, kl)
        return fitted

    ctx.log.info("training the model of all %d particles", len(pset))
    model = make_model(params["seed"], reader, prep)
    objective, res, terms = train(model, reader, prep, out)
    halves = None
    if params["halfsets"]:
        encoder = {k: v.detach().clone() for k, v in objective.encoder.state_dict().items()}
        halves = _train_halves(params, ctx, pset, prep, make_model, train, encoder, opts, hooks)
    model.cpu()
    weights = objective.restraint_weight.tolist()
    model.save(out / "model.safetensors", {"particles": str(Path(params["particles"]).resolve()),
                                           "consensus_map": str(Path(cmap_path).resolve()),
                                           "restraint_weights": json.dumps(weights),
                                           "history": json.dumps(res.history)})
    half_meta = {} if halves is None else {"half_models": halves["summary"]["models"],
                                            "half_latents": ["half1_z.npy", "half2_z.npy"]}
    ctx.add("model", "model.safetensors", "Gaussian mixture of the consensus map displaced by an MLP of z",
            model_type="gaussian_mixture", latent_dim=params["zdim"], box=pset.box, apix=pset.apix,
            n_gaussians=len(atoms), **half_meta)
    z = res.z_mu.astype(np.float64)
    # the half-set of each particle goes with the half models (reconstruct-deformed, RELION read rlnRandomSubset)
    extra = None if halves is None else {"cryohetDeformErrorA": halves["error"],
                                         "rlnRandomSubset": halves["halves"].astype(np.int64)}
    write_latents(ctx, pset, {"z.npy": res.z_mu, "z_logvar.npy": res.z_logvar}, z,
                  f"latent means (N, {params['zdim']})", f"particles with cryohetZ1..{params['zdim']}"
                  + (", cryohetDeformErrorA and the half-sets (rlnRandomSubset)" if halves is not None else ""),
                  extra, poses=objective.poses, fit_model=model, logvar="z_logvar.npy")
    summary = write_gmm_outputs(ctx, model, z, params, halves)
    summary.update({"model": model.describe(), "n_particles": len(pset), "support": plan.describe_dict(),
                    "consensus_fit": fit_report, "spacing_A": spacing,
                    "restraints": {"springs": int(len(restraints.edges)), "cutoff_A": restraints.cutoff_A,
                                   "clash_distance_A": restraints.min_distance_A, "elastic_weight": weights[0],
                                   "clash_weight": weights[1], "factors": list(factors)},
                    "latent_kl": latent_kl, "collapsed": sorted(k for k, v in latent_kl.items() if v < COLLAPSED_KL),
                    "history": res.history, "terms": terms, "epoch_seconds": res.epoch_seconds})
    if halves is not None:
        summary["halfsets"] = halves["summary"]
    ctx.write_report(json.dumps(summary, indent=1), "fit of the consensus map, restraint weights, losses per epoch, "
                     "half-set deformation errors", name=FIT_NAME)


def _train_halves(params: dict[str, Any], ctx: Any, pset: Any, prep: Any, make_model: Any, train: Any,
                  encoder: dict[str, Any], opts: Any, hooks: Any) -> dict[str, Any]:
    """Train one model per half-set (folders half1, half2; each resumable), encode every particle (prepared by
    ``prep``) with both and return the per-particle and per-Gaussian deformation errors with their summary.

    Each half's decoder starts from scratch (its own seed) and its encoder from the all-particle model's
    ``encoder`` state: a fresh encoder on half the particles often falls into posterior collapse at low SNR (both
    halves then predict no motion and the error reads 0); the displacements, whose disagreement is the error,
    are still learned from each half alone."""
    from cryohet.data.prepare import ImagePreparer
    from cryohet.inference.deformation_halves import deformation_errors, encode_all
    from cryohet.reconstruct.homogeneous import particle_halves

    out = Path(ctx.out_dir)
    half = particle_halves(pset, ctx.seed)
    models, zs = [], []
    for h in (1, 2):
        rows = np.flatnonzero(half == h)
        sub = pset.subset(rows)
        sub_prep = ImagePreparer(sub, prep.lattice, prep.points)
        ctx.log.info("training the model of half-set %d (%d particles)", h, len(rows))
        model = make_model(params["seed"] + h, sub.reader(), sub_prep)
        objective, _, _ = train(model, sub.reader(), sub_prep, out / f"half{h}", encoder)
        zs.append(encode_all(objective, pset.reader(), prep, opts, ctx.device, hooks))
        model.cpu().save(out / f"half{h}" / "model.safetensors", {"half": str(h)})
        models.append(model)
    err, per_gaussian = deformation_errors(models[0], zs[0], models[1], zs[1], ctx.device)
    with_half = {"half1_z.npy": zs[0], "half2_z.npy": zs[1], "deformation_error.npy": err.astype(np.float32),
                 "gaussian_error.npy": per_gaussian.astype(np.float32)}
    summary = {"particles": [int((half == 1).sum()), int((half == 2).sum())],
               "error_A": {"mean": float(err.mean()), "median": float(np.median(err)),
                           "p95": float(np.percentile(err, 95)), "max": float(err.max())},
               "gaussian_error_A": {"median": float(np.median(per_gaussian)), "max": float(per_gaussian.max())},
               "models": ["half1/model.safetensors", "half2/model.safetensors"]}
    ctx.log.info("half-set deformation error: median %.2f Å, 95th percentile %.2f Å",
                 summary["error_A"]["median"], summary["error_A"]["p95"])
    return {"error": err, "per_gaussian": per_gaussian, "arrays": with_half, "halves": half, "summary": summary}


METHOD = Method(
    name="train-gmm",
    order=44,
    title="Train a Gaussian mixture of a consensus map deformed per particle (e2gmm, DynaMight)",
    help="Represents the consensus map by Gaussian pseudo-atoms (weighted k-means of its density, or the residues "
         "of an atomic model) whose amplitudes are fitted to the map, then trains an encoder of each particle image "
         "to q(z | image) and a decoder of z into every Gaussian's displacement (Gaussians projected analytically at "
         "the particle's pose with its CTF), maximising the evidence lower bound with an elastic network between "
         "neighbouring Gaussians and a clash term, their weights calibrated against the data term (DynaMight's "
         "rule). With --halfsets (default) a model is also trained on each half of the particles; each particle's "
         "deformation error is the RMS difference of the displacements the two half models give it. Writes the "
         "model, latents, the particles STAR (cryohetZ1..d, cryohetDeformErrorA), maps and pseudo-atom models "
         "along the first principal components of z and at k-means centres, per-Gaussian displacements along PC1 "
         "with a ChimeraX script that plays the models beside the maps, latent and error plots, and a JSON report "
         "(fit of the consensus, restraint weights, per-epoch terms, errors). A checkpoint per model is written "
         "after every epoch: --resume yes continues.",
    params=PARAMS,
    outputs=("model", "latents", "particles_star", "volume_series", "atomic_model", "chimerax", "plot", "report"),
    run=run,
    citations=("Schwab, Kimanius, Burt, Dendooven & Scheres (2024) DynaMight: estimating molecular motions with "
               "improved reconstruction from cryo-EM images. Nature Methods 21, 1855-1862.",
               "Chen & Ludtke (2021) Deep learning-based mixed-dimensional Gaussian mixture model for "
               "characterizing variability in cryo-EM. Nature Methods 18, 930-936."),
)
