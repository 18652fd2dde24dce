"""``--refine_poses`` for the trained methods: the parameters, the settings they give, and the outputs (the
refined poses in the particles, a figure and a table of the change per particle).

(A ``_`` module: not a method, so the registry, the hosts and the pipeliner skip it.)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import Param

POSE_PARAMS = (
    Param("refine_poses", bool, False, "Refine each particle's pose (rotation and origin) with the model by "
          "stochastic gradient descent (cryoDRGN's --do-pose-sgd): the particles STAR then holds the refined "
          "rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst."),
    Param("pose_warmup_epochs", int, 2, "Epochs trained on the input poses before they are refined "
          "(--refine_poses).", min=0, expert=True),
    Param("pose_lr_deg", float, 0.3, "Step of the per-particle rotation corrections, degrees per update (row-wise "
          "Adam; --refine_poses).", min=0.0, expert=True),
    Param("pose_lr_A", float, 0.25, "Step of the per-particle origin corrections, Å per update (--refine_poses).",
          min=0.0, expert=True),
    Param("pose_max_deg", float, 10.0, "Largest rotation away from a particle's input pose, degrees "
          "(--refine_poses).", min=0.0, expert=True),
    Param("pose_max_A", float, 5.0, "Largest origin change from a particle's input origin, Å (--refine_poses).",
          min=0.0, expert=True),
)

#: ``--refine_poses`` of the methods fitted by EM (principal volumes): rounds of a local search against the model
SEARCH_PARAMS = (
    Param("refine_poses", bool, False, "Refine each particle's pose (rotation and origin) by a local search "
          "against the model's slice at the particle's coordinates, alternated with the fit (--pose_rounds "
          "times): the particles STAR then holds the refined rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst."),
    Param("pose_rounds", int, 1, "Pose re-searches, each followed by a new fit (--refine_poses). More than one can "
          "drift: the model is refitted to the images on the poses it gave them (measured in docs/benchmarks.md).",
          min=1, max=20),
    Param("pose_max_deg", float, 8.0, "Largest rotation away from a particle's pose in one re-search, degrees "
          "(--refine_poses).", min=0.0, expert=True),
    Param("pose_max_A", float, 4.0, "Largest origin change in one re-search, Å (--refine_poses).", min=0.0,
          expert=True),
)

CHANGES_NAME, PLOT_NAME = "pose_changes.csv", "pose_changes.png"


@dataclasses.dataclass
class SearchedPoses:
    """Poses changed by a search (rather than a trainer's ``PoseCorrections``): each particle's rotation from its
    input pose (degrees) and origin change (Å), as ``write_pose_changes`` reads them."""

    angle_deg: np.ndarray
    shift_A: np.ndarray

    @classmethod
    def between(cls, before: Any, after: Any) -> SearchedPoses:
        """The changes from the poses of particle set ``before`` to those of ``after``."""
        import torch

        from cryohet.geometry.euler import euler_to_matrix
        from cryohet.inference.pose_search import angle_between_deg

        angle = angle_between_deg(torch.as_tensor(euler_to_matrix(before.euler_deg)),
                                  torch.as_tensor(euler_to_matrix(after.euler_deg))).numpy()
        return cls(np.asarray(angle, dtype=np.float64),
                   np.linalg.norm(np.asarray(after.shift_A) - np.asarray(before.shift_A), axis=1))

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.angle_deg, self.shift_A


def pose_options(params: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of ``PoseCorrections`` from a method's parameters (None without --refine_poses)."""
    if not params.get("refine_poses"):
        return None
    return {"lr_deg": params["pose_lr_deg"], "lr_A": params["pose_lr_A"],
            "warmup_epochs": params["pose_warmup_epochs"], "max_deg": params["pose_max_deg"],
            "max_A": params["pose_max_A"]}


def refined_particles(pset: Any, poses: Any) -> Any:
    """``pset`` with the refined poses of ``poses`` (a ``PoseCorrections``; None: ``pset`` as it is)."""
    if poses is None:
        return pset
    euler, shift = poses.refined(pset.euler_deg, pset.shift_A)
    return dataclasses.replace(pset, euler_deg=euler, shift_A=shift)


def pose_columns(pset: Any) -> dict[str, np.ndarray]:
    """RELION's pose columns of ``pset`` (they replace the input's in the STAR)."""
    return {"rlnAngleRot": pset.euler_deg[:, 0], "rlnAngleTilt": pset.euler_deg[:, 1],
            "rlnAnglePsi": pset.euler_deg[:, 2], "rlnOriginXAngst": pset.shift_A[:, 0],
            "rlnOriginYAngst": pset.shift_A[:, 1]}


def write_pose_changes(ctx: Any, poses: Any) -> None:
    """The change of every particle's pose (angle in degrees, origin in Å) as a CSV and histograms, logged and
    recorded."""
    from matplotlib.figure import Figure

    from cryohet.analysis.plots import save_png
    from cryohet.atomic import atomic_path

    out = Path(ctx.out_dir)
    angle_deg, shift_A = poses.changes()
    with atomic_path(out / CHANGES_NAME) as tmp:
        np.savetxt(tmp, np.stack([np.arange(len(angle_deg)), angle_deg, shift_A], 1), delimiter=",",
                   header="row,rotation_deg,origin_change_A", comments="", fmt=["%d", "%.5f", "%.5f"])
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax = fig.subplots(1, 2)
    ax[0].hist(angle_deg, bins=50)
    ax[0].set(xlabel="rotation from the input pose (degrees)", ylabel="particles", title="pose refinement: angle")
    ax[1].hist(shift_A, bins=50, color="C1")
    ax[1].set(xlabel="origin change (Å)", ylabel="particles", title="pose refinement: origin")
    save_png(fig, out / PLOT_NAME, dpi=100)
    ctx.log.info("pose refinement: rotation from the input poses median %.3f°, 90%% %.3f°; origin change median "
                 "%.3f Å, 90%% %.3f Å", np.median(angle_deg), np.percentile(angle_deg, 90), np.median(shift_A),
                 np.percentile(shift_A, 90))
    ctx.add("plot", PLOT_NAME, "pose change per particle (--refine_poses)", table=CHANGES_NAME,
            median_rotation_deg=float(np.median(angle_deg)), median_origin_change_A=float(np.median(shift_A)))
