"""``cryohet validate-halfsets``: run a method on two half-sets and check that the halves agree."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.methods.base import Method, Param
from cryohet.validation.halfsets import (
    MIN_IDENTIFIABILITY,
    MIN_LATENT_CORR,
    HalfSplit,
    compare_halves,
    split_indices,
)

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("method", str, None, "The cryohet method to validate (e.g. principal-volumes, train-vae); it must take "
          "particles and register latents (and a model, for the map comparison).", required=True),
    Param("particles", Path, None, "Particles (RELION .star or cryoSPARC .cs) to split.", required=True,
          input_role="particles"),
    Param("method_params", str, None, "The method's other parameters, as 'name=value name=value' or "
          "'--name value --name value'. The particles parameter and --seed are set per half."),
    Param("use_subsets", bool, True, "Split by rlnRandomSubset when the particles have it (else at random)."),
    Param("probe_fraction", float, 0.1, "Fraction of the particles given to both halves as probes (the matched "
          "points of the two latent spaces; at least 8).", min=0.01, max=0.33),
    Param("n_volumes", int, 16, "Probe particles at which both halves' maps are made and compared.", min=2),
    Param("k", int, 10, "Neighbours for the probe k-NN overlap (at most a quarter of the probes).", min=1),
    Param("min_latent_corr", float, MIN_LATENT_CORR, "Flag when the probes' mean cross-validated canonical "
          "correlation between the halves' latents is below this.", min=0.0, max=1.0),
    Param("min_identifiability", float, MIN_IDENTIFIABILITY, "Flag when maps at matched points are more alike "
          "than at unmatched points less often than this (0.5 = chance).", min=0.0, max=1.0),
    Param("mask_radius_px", float, 0.0, "Soft spherical mask radius for the map comparison, pixels (0: none).",
          min=0.0, expert=True),
)


def particles_param(method: Method) -> str:
    """Name of the method's particles input."""
    for p in method.all_params():
        if p.input_role == "particles":
            return p.name
    raise ValueError(f"method {method.name} takes no particles, so it cannot be run on half-sets")


def run_halves(method: Method, values: dict[str, Any], particles: str | Path, out_dir: str | Path,
               probe_fraction: float = 0.1, use_subsets: bool = True, seed: int = 0,
               log: logging.Logger | None = None) -> tuple[HalfSplit, tuple[Path, Path]]:
    """Write the two half STARs (out_dir/half{1,2}_particles.star) and run ``method`` on each into
    out_dir/half1 and out_dir/half2 (seeds ``seed`` and ``seed + 1``). ``values``: the method's other
    parameters (strings or typed values)."""
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.runner import run_method

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pset = load_particles(particles)
    subsets = None
    if use_subsets and "rlnRandomSubset" in pset.table.columns:
        subsets = np.asarray(pset.table["rlnRandomSubset"], dtype=np.int64)
    split = split_indices(len(pset), probe_fraction, subsets, seed)
    pname = particles_param(method)
    dirs = []
    for h in (1, 2):
        star = out_dir / f"half{h}_particles.star"
        write_particles_star(star, pset, rows=split.rows[h - 1])
        vals = dict(values)
        vals[pname] = str(star)
        vals["seed"] = seed + h - 1
        if log is not None:
            log.info("half %d: %d particles (%d probes); running %s", h, len(split.rows[h - 1]),
                     len(split.probes), method.name)
        run_method(method, vals, out_dir / f"half{h}")
        dirs.append(out_dir / f"half{h}")
    return split, (dirs[0], dirs[1])


def validate_halfsets(method: Method, values: dict[str, Any], particles: str | Path, out_dir: str | Path,
                      probe_fraction: float = 0.1, use_subsets: bool = True, seed: int = 0,
                      log: logging.Logger | None = None, **compare: Any) -> dict[str, Any]:
    """Run ``method`` on two half-sets and compare them; returns the ``compare_halves`` result."""
    split, (r1, r2) = run_halves(method, values, particles, out_dir, probe_fraction, use_subsets, seed, log)
    result = compare_halves(r1, r2, split, seed=seed, **compare)
    result["method"] = method.name
    return result


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.methods import get_method
    from cryohet.validation.halfsets import halfsets_markdown, parse_method_params, plot_halfsets
    from cryohet.validation.report import write_json

    if params["method"] == METHOD.name:
        raise ValueError("validate-halfsets cannot validate itself")
    try:
        method = get_method(params["method"])
    except KeyError as exc:
        raise ValueError(str(exc)) from None
    values: dict[str, Any] = {"device": params["device"], "threads": params["threads"],
                              "overwrite": params["overwrite"]}  # half1/, half2/ are replaced with this run
    values.update(parse_method_params(params["method_params"]))
    result = validate_halfsets(method, values, params["particles"], ctx.out_dir,
                               probe_fraction=params["probe_fraction"], use_subsets=params["use_subsets"],
                               seed=ctx.seed, log=ctx.log, n_volumes=params["n_volumes"], k=params["k"],
                               mask_radius_px=params["mask_radius_px"] or None,
                               min_latent_corr=params["min_latent_corr"],
                               min_identifiability=params["min_identifiability"])
    out = Path(ctx.out_dir)
    figure = plot_halfsets(result, out / "halfsets_fsc.png") if result["volume"] else None
    metrics = write_json(result, out / "halfsets.json")
    if result["flagged"]:
        ctx.log.warning("FLAGGED: %s", "; ".join(result["reasons"]))
    else:
        ctx.log.info("the two halves agree")
    summary = {"flagged": result["flagged"], "latent_cca_mean": result["latent"]["cca_mean"]}
    if result["volume"]:
        summary.update(identifiability=result["volume"]["identifiability"],
                       matched_fsc_auc=result["volume"]["matched_fsc_auc"])
    ctx.write_report(halfsets_markdown(result, figure.name if figure else None),
                     f"half-set validation of {method.name}", **summary)
    ctx.add("report", metrics, "half-set comparison (JSON), FSC curves at matched and unmatched points")
    if figure:
        ctx.add("plot", figure, "FSC between the halves' maps at matched probe points")


METHOD = Method(
    name="validate-halfsets",
    order=100,
    title="Half-set validation of a method",
    help="Validation without ground truth: split the particles in two halves plus a small probe set given to both, "
         "run a method on each half (half1/, half2/), and compare the halves at the probe particles, whose latents "
         "in the two spaces are matched points: canonical correlation of the latents, FSC between the two models' "
         "maps at matched points (and at unmatched points as a control), and whether matched maps are more alike "
         "than unmatched ones. The method is flagged when its halves disagree (thresholds in "
         "docs/benchmarks/validation.md).",
    params=PARAMS,
    outputs=("report", "plot"),
    run=run,
)
