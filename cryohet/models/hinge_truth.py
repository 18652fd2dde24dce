"""The simulator's hinge motion as a DeformationModel with z = τ: ground truth for deformation-corrected
reconstruction, without a trained model.

``volumes(z)`` are the true maps (the atoms with the moving part turned by τ·max_angle_deg, rendered as
``simulate.density`` does), ``displacement_field`` the true field of ``simulate.deformation_truth.HingeField``.
Saved as safetensors (atoms, weights, moving mask, hinge) under ``MODEL_TYPE``, so that a run folder holding it
is read by ``models.base.load_volume_model`` like a trained model's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryohet.atomic import save_npy
from cryohet.errors import InputError
from cryohet.geometry.gaussians import gaussian_map
from cryohet.io.atomic_model import box_centre_A
from cryohet.io.particles import ParticleSet, write_particles_star
from cryohet.io.weights import read_weights, write_weights
from cryohet.record import RunRecord
from cryohet.simulate.deformation_truth import HingeField

MODEL_TYPE = "hinge_truth"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-hinge-truth-1"


class HingeTruthModel:
    """``field`` (atoms relative to the box centre) and their ``weights`` (electrons) in a box of ``box`` pixels
    of ``apix`` Å, maps rendered at ``resolution_A``."""

    latent_dim = 1

    def __init__(self, field: HingeField, weights: np.ndarray, box: int, apix: float, resolution_A: float):
        self.field, self.weights = field, np.asarray(weights, dtype=np.float64)
        self.box, self.apix, self.resolution_A = int(box), float(apix), float(resolution_A)

    def displacement_field(self, z: torch.Tensor, x_A: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) Å at τ = ``z`` (B, 1) of canonical points ``x_A`` (P, 3) Å from the box centre."""
        return self.field.displacement(z, x_A)

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """True maps (M, box, box, box) at τ = ``z`` (M, 1), float32, (z, y, x)."""
        centre = box_centre_A(self.box, self.apix)
        f = self.field
        maps = []
        for t in np.atleast_2d(np.asarray(z, dtype=np.float64))[:, 0]:
            xyz = f.atoms_A.copy()
            xyz[f.moving] = (xyz[f.moving] - f.point_A) @ f.rotation(t).T + f.point_A
            maps.append(gaussian_map(xyz + centre, self.weights, self.box, self.apix, self.resolution_A, centre))
        return np.stack(maps).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        f = self.field
        tensors = {"atoms_A": torch.as_tensor(f.atoms_A), "weights": torch.as_tensor(self.weights),
                   "moving": torch.as_tensor(f.moving.astype(np.float64)), "point_A": torch.as_tensor(f.point_A),
                   "axis": torch.as_tensor(f.axis)}
        meta = {"format": MODEL_FORMAT, "box": str(self.box), "apix": repr(self.apix),
                "resolution_A": repr(self.resolution_A), "max_angle_deg": repr(f.max_angle_deg),
                "soft_A": repr(f.soft_A)}
        return write_weights(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> HingeTruthModel:
        tensors, meta = read_weights(path)
        if meta.get("format") != MODEL_FORMAT:
            raise InputError(path, f"not a cryohet hinge truth model (format {meta.get('format')!r})")
        t = {k: v.double().numpy() for k, v in tensors.items()}
        field = HingeField(t["atoms_A"], t["moving"] > 0.5, t["point_A"], t["axis"], float(meta["max_angle_deg"]),
                           float(meta["soft_A"]))
        return cls(field, t["weights"], int(meta["box"]), float(meta["apix"]), float(meta["resolution_A"]))


def write_run(run_dir: Path, model: HingeTruthModel, pset: ParticleSet, tau: np.ndarray) -> Path:
    """A run folder holding ``model``, the particles' true τ (N, 1) as latents and their STAR with cryohetZ1 = τ,
    recorded as a finished run: what ``reconstruct-deformed --run`` reads from a trained model's run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tau = np.asarray(tau, dtype=np.float32).reshape(len(pset), 1)
    model.save(run_dir / "model.safetensors")
    save_npy(run_dir / "latents.npy", tau)
    write_particles_star(run_dir / "particles.star", pset, extra_columns={"cryohetZ1": tau[:, 0]})
    rec = RunRecord("simulate", {}, status="finished")
    rec.add("model", "model.safetensors", run_dir, "the true hinge motion", model_type=MODEL_TYPE)
    rec.add("latents", "latents.npy", run_dir, "true τ", dim=1)
    rec.add("particles_star", "particles.star", run_dir, "particles with cryohetZ1 = τ", columns=["cryohetZ1"])
    return rec.write(run_dir)


def load_run_model(run_dir: str | Path, model_path: str | Path) -> HingeTruthModel:
    """The model of a run folder that holds a hinge truth model."""
    return HingeTruthModel.load(model_path)
