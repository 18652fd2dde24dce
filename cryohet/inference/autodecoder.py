"""Per-particle latent tables (an auto-decoder, as 3DFlex and DRGN-AI use): each particle's q(z) is free.

Every particle has its own mean and log-variance of z, optimised with the volume on the same ELBO as the VAE
(no encoder): nothing is amortised, so a latent moves only when its particle is in a batch, and the table takes
a larger learning rate than the network (``latent_lr``). Memory: 2 × zdim numbers per particle.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from cryohet.data.prepare import ImageBatch
from cryohet.geometry.lattice import Points
from cryohet.inference.elbo import gaussian_elbo, kl_weight
from cryohet.inference.freq_march import FrequencyMarch, MarchingObjective, restrict
from cryohet.inference.pose_tables import PoseCorrections, posed
from cryohet.models.neural import NeuralVolume, init_linear

#: Standard deviation of the latents' initial means and of q(z) at the start.
INIT_STD = 0.1


class AutoDecoderInference(MarchingObjective, nn.Module):
    """Latent table + volume, trained on the ELBO. ``settings``: n_particles, latent_lr; ``march``: the share of
    the epochs spent widening the fitted circle (frequency marching, ``freq_march.py``)."""

    kind = "autodecoder"

    def __init__(self, volume_cfg: Any, points: Points, settings: dict[str, Any], beta: float = 0.0,
                 poses: PoseCorrections | None = None, march: float = 0.0, beta_warmup: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(volume_cfg.seed))
        n, d = int(settings["n_particles"]), volume_cfg.zdim
        self.settings = {"kind": self.kind, "n_particles": n, "latent_lr": float(settings["latent_lr"])}
        self.decoder = NeuralVolume(volume_cfg, g)
        init_linear(self, g)
        self.table = nn.ParameterDict({
            "mu": nn.Parameter(torch.randn((n, d), generator=g) * INIT_STD),
            "logvar": nn.Parameter(torch.full((n, d), 2 * math.log(INIT_STD)))})
        self.poses = poses
        if poses is not None:
            self.settings["poses"] = poses.settings
        self.register_buffer("kxy", points.kxy, persistent=False)
        self.noise_dim, self.beta, self.beta_warmup = d, beta, int(beta_warmup)
        self.kl_weight = kl_weight(beta, d, len(points))
        self.march, self.fit_radius = FrequencyMarch(points.kxy, volume_cfg.max_freq, march), volume_cfg.max_freq

    @staticmethod
    def inputs(b: ImageBatch) -> dict[str, torch.Tensor]:
        return {"y": torch.view_as_real(b.images_ft).contiguous(), "ctf": b.ctf, "rot": b.rotations,
                "rows": torch.as_tensor(b.rows, dtype=torch.long)}

    def forward(self, d: dict[str, torch.Tensor], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = d["rows"]
        rot, y = posed(self.poses, d, self.kxy)
        kxy, y, ctf = restrict(self.active, self.kxy, y, d["ctf"])
        return gaussian_elbo(self.decoder, kxy, rot, y, ctf, self.table["mu"][rows], self.table["logvar"][rows],
                             eps)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.decoder.parameters()), "lr": lr},
                {"params": list(self.table.parameters()), "lr": self.settings["latent_lr"], "weight_decay": 0.0}]

    @torch.no_grad()
    def latents(self, batches: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, mu, logvar) of the particles of ``batches`` (a BatchStream) from the table; no image is read."""
        rows = np.concatenate(batches.batches) if len(batches.batches) else np.zeros(0, np.int64)
        mu, logvar = self.table["mu"][torch.as_tensor(rows)], self.table["logvar"][torch.as_tensor(rows)]
        return rows, mu.float().cpu().numpy(), logvar.float().cpu().numpy()
