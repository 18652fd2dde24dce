"""``cryohet benchmark-score``: score a heterogeneity result against a benchmark dataset's ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryohet.methods.base import Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("dataset", Path, None, "Benchmark dataset folder (made by cryohet benchmark-make).", required=True),
    Param("run", Path, None, "A cryohet run folder on that dataset's particles.star: its latents and, when it has "
          "one, its model of the volumes are scored."),
    Param("latents", Path, None, "Or per-particle latents from any tool, in the order of the dataset's "
          "particles.star: .npy, .txt/.csv, or cryoDRGN's z.N.pkl (read safely: numpy arrays only)."),
    Param("volumes", Path, None, "With --latents: a folder of MRC maps (name order), with --volume_labels or "
          "--volume_latents saying which map belongs to which particle."),
    Param("volume_labels", Path, None, "Per-particle index into the --volumes maps (.npy, .txt or cryoDRGN's "
          "labels.pkl), e.g. k-means cluster labels."),
    Param("volume_latents", Path, None, "Latent point of each --volumes map (K, d) (e.g. cryoDRGN's centers.txt): "
          "each particle gets the map whose point is nearest its latent."),
    Param("cryodrgn_weights", Path, None, "With --latents z.N.pkl: cryoDRGN weights.N.pkl; volumes are made by "
          "'cryodrgn eval_vol' (cryoDRGN must be installed)."),
    Param("cryodrgn_config", Path, None, "cryoDRGN config.yaml (with --cryodrgn_weights)."),
    Param("cryodrgn_flip", bool, False, "Pass --flip to cryodrgn eval_vol (flip handedness).", expert=True),
    Param("reference", str, "none", "Score the known answer instead of a result: truth (true τ and true maps: each "
          "metric's ceiling) or shuffled (truth permuted across particles: chance level).",
          choices=("none", "truth", "shuffled")),
    Param("label", str, None, "Name of the result in the report (default: the run's method)."),
    Param("n_per_state", int, 4, "Particles sampled per true state for the volume FSC.", min=1),
    Param("max_states", int, 20, "At most this many true states evaluated (evenly spread).", min=1),
    Param("k", int, 10, "Neighbours for the k-NN overlap and k-NN regression.", min=1),
    Param("max_points", int, 20000, "Latent metrics on at most this many particles (random subset).", min=10,
          expert=True),
    Param("mask_radius_px", float, 0.0, "Soft spherical mask radius for the FSC, pixels of the compared box (0: "
          "no mask).", min=0.0, expert=True),
    Param("n_images", int, 100, "CryoBench's per-image FSC on this many evenly spaced images (0, N/n, 2N/n, …).",
          min=1),
    Param("volumes_off", bool, False, "Score the latents only (skip the volume FSC).", expert=True),
    Param("homogeneous_map", Path, None, "Homogeneous reconstruction of the dataset's particles (MRC, e.g. cryohet "
          "reconstruct's map.mrc) used for every particle as the reference the maps are compared with; empty: "
          "reconstructed here (half-sets, plain division as relion_reconstruct, weighted per shell by their FSC).",
          expert=True),
)


def _homogeneous(path: Path | None, ds: Any, ctx: RunContext) -> Any:
    """The map of ``--homogeneous_map`` (the dataset's box and pixel size), else the particles reconstructed here."""
    from cryohet.io.mrc import read_map_like
    from cryohet.validation.score import homogeneous_map

    if path is None:
        ctx.log.info("reconstructing the dataset's particles for the homogeneous-map reference")
        return homogeneous_map(ds, device=str(ctx.device), seed=ctx.seed)
    return read_map_like(path, ds.box, ds.apix, "--homogeneous_map")


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.validation import score as S
    from cryohet.validation.datasets import load_dataset
    from cryohet.validation.external import load_latents
    from cryohet.validation.report import write_score_report
    from cryohet.validation.sources import run_latents

    ds = load_dataset(params["dataset"])
    opts = dict(k=params["k"], n_per_state=params["n_per_state"], max_states=params["max_states"],
                max_points=params["max_points"], seed=ctx.seed, n_images=params["n_images"],
                mask_radius_px=params["mask_radius_px"] or None,
                log=ctx.log)
    if not params["volumes_off"]:
        opts["homogeneous"] = _homogeneous(params["homogeneous_map"], ds, ctx)
    if params["label"]:
        opts["label"] = params["label"]
    given = [n for n in ("run", "latents") if params[n] is not None]
    if params["reference"] != "none":
        if given:
            raise ValueError("--reference scores the known answer: give no --run or --latents with it")
        opts.pop("label", None)
        result = S.score_true_answer(ds, shuffle=params["reference"] == "shuffled", **opts)
        z, _ = S.true_answer(ds, params["reference"] == "shuffled", ctx.seed)
    elif len(given) != 1:
        raise ValueError("give exactly one of --run and --latents (or --reference)")
    elif params["run"] is not None:
        result = S.score_run(params["run"], ds.root, volumes=not params["volumes_off"], **opts)
        z = run_latents(params["run"])
    else:
        if params["volumes"] is None and (params["volume_labels"] or params["volume_latents"]):
            raise ValueError("--volume_labels / --volume_latents need --volumes (the folder of maps)")
        z = load_latents(params["latents"])
        if params["cryodrgn_weights"] is not None or params["cryodrgn_config"] is not None:
            result = S.score_cryodrgn(params["latents"], ds.root, params["cryodrgn_weights"],
                                      params["cryodrgn_config"], flip=params["cryodrgn_flip"], **opts)
        else:
            opts.setdefault("label", Path(params["latents"]).stem)
            result = S.score_arrays(z, ds.root, None if params["volumes_off"] else params["volumes"],
                                    params["volume_labels"], params["volume_latents"], **opts)
    paths = write_score_report(result, ctx.out_dir, z, ds)
    s = result["summary"]
    ctx.log.info("summary: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in s.items()))
    ctx.add("report", paths["report"], f"benchmark score: {result['label']} on {ds.name}", **{
        ("result" if k == "label" else k): v for k, v in s.items() if isinstance(v, (int, float, str))})
    ctx.add("report", paths["metrics"], "all metrics (JSON), FSC curves per true state included")
    if "latents" in paths:
        ctx.add("plot", paths["latents"], "latents coloured by the true conformation")
    if "fsc" in paths:
        ctx.add("plot", paths["fsc"], "FSC of the result's maps against the true maps, per state")


METHOD = Method(
    name="benchmark-score",
    order=90,
    title="Score a result against ground truth",
    help="Compare a heterogeneity result with a benchmark dataset's ground truth: CryoBench's scores (per-image "
         "FSC AUC on 100 evenly spaced images against their true maps with a mask of the true maps, the per-state "
         "score, neighbourhood similarity, information imbalance), per-image volume FSC against "
         "the true map (area under the curve, resolution at 0.5 and 0.143, averaged per true state) and latent "
         "versus truth agreement (|Spearman| for 1-D motions, k-NN overlap, CCA, k-means adjusted Rand index for "
         "discrete states), with chance levels and, for the maps, the homogeneous reconstruction of the same "
         "particles as the reference (does the method add information over one map?). Reads a cryohet run "
         "folder, plain latent arrays with a folder of maps, or cryoDRGN's z.N.pkl "
         "(and its decoder through cryodrgn eval_vol). Writes report.md, metrics.json "
         "and PNG plots. Definitions: docs/benchmarks/validation.md.",
    params=PARAMS,
    outputs=("report", "plot"),
    run=run,
)
