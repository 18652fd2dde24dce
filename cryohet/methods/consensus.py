"""``cryohet consensus``: how well several methods' latent spaces agree on one dataset (survey section 10)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryohet.methods.base import Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

PARAMS = (
    Param("inputs", str, None, "Results on the same particles, comma-separated: cryohet run folders (their latents) "
          "or latent files (.npy, .txt, cryoDRGN z.N.pkl), rows in the same particle order.", required=True),
    Param("labels", str, None, "Names of the results, comma-separated (default: the run's method or file name)."),
    Param("k", int, 10, "Neighbours for the k-NN overlap.", min=1),
    Param("max_points", int, 20000, "Use at most this many particles (the same random subset for all).", min=10,
          expert=True),
)


def _label(item: Path) -> str:
    from cryohet.record import read_record

    if item.is_dir():
        try:
            return f"{read_record(item).method} ({item.name})"
        except Exception:  # noqa: BLE001 (the label is cosmetic; loading reports the real error)
            return item.name
    return item.stem


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.validation.consensus import consensus, load_result_latents, write_consensus_report

    items = [Path(s.strip()) for s in params["inputs"].split(",") if s.strip()]
    if len(items) < 2:
        raise ValueError("--inputs needs at least two results")
    labels = [s.strip() for s in params["labels"].split(",")] if (params["labels"] or "").strip() else [
        _label(p) for p in items]
    if len(labels) != len(items) or len(set(labels)) != len(labels):
        raise ValueError("--labels needs one distinct name per input")
    latents = {lab: load_result_latents(p) for lab, p in zip(labels, items, strict=True)}
    result = consensus(latents, k=params["k"], max_points=params["max_points"], seed=ctx.seed)
    paths = write_consensus_report(result, ctx.out_dir)
    for p in result["pairs"]:
        ctx.log.info("%s vs %s: |Spearman PC1| %.3f, CCA %.3f, k-NN overlap %.3f", p["a"], p["b"],
                     p["spearman_pc1"], p["cca_mean"], p["knn_overlap"])
    ctx.add("report", paths["report"], "consensus across methods", n_results=len(labels))
    ctx.add("plot", paths["plot"], "pairwise agreement heatmaps")
    ctx.add("report", paths["metrics"], "pairwise agreement (JSON)")


METHOD = Method(
    name="consensus",
    order=110,
    title="Consensus across methods",
    help="For one dataset and several results (run folders or latent files, same particle order), report how well "
         "their latent orderings agree: |Spearman| of first principal components, cross-validated canonical "
         "correlations and k-NN overlap, as a table and heatmaps. Agreement between fundamentally different "
         "methods is a stand-in for validation (survey section 10).",
    params=PARAMS,
    outputs=("report", "plot"),
    run=run,
)
