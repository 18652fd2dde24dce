"""Amortised inference: an encoder maps each particle image to q(z | image) (the VAE of cryoDRGN, survey 7.2).

The encoder sees the image, or its residual against the anchored base map, either as the centred, CTF-phase-flipped
transform (real and imaginary parts on the half-plane inside the resolution circle, cryoDRGN's) or as its responses
to 3-D filter maps sliced at the image's pose (``pose_filters``): learnt, or fixed (a linear run's maps, or the
covariance's leading eigenvectors, optionally with a second, learnt bank beside them that starts at zero), and
returns the mean and log-variance of q(z | image).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from cryohet.data.prepare import ImageBatch
from cryohet.geometry.lattice import Points
from cryohet.inference.elbo import gaussian_elbo, kl_weight
from cryohet.inference.filter_covariance import COVARIANCE_PARTICLES, POWER_PASSES, covariance_filters, signal_extent
from cryohet.inference.freq_march import FrequencyMarch, MarchingObjective, restrict
from cryohet.inference.pose_filters import PoseFilterBank
from cryohet.inference.pose_tables import PoseCorrections, posed
from cryohet.models.neural import NeuralVolume, ResidMLP, init_linear


def loss_inputs(b: ImageBatch, encoder_image: bool = True) -> dict[str, torch.Tensor]:
    """The loss inputs of a prepared batch: the transforms ``y`` (B, M, 2), ``ctf``, ``rot``, ``rows`` and, with
    ``encoder_image``, the encoder's phase-flipped image ``enc`` (B, 2M), as cryoDRGN's."""
    yr = torch.view_as_real(b.images_ft).contiguous()
    out = {"y": yr, "ctf": b.ctf, "rot": b.rotations, "rows": torch.as_tensor(b.rows, dtype=torch.long)}
    if encoder_image:
        out["enc"] = (yr * torch.sign(b.ctf)[..., None]).reshape(len(b.rows), -1)
    return out


#: the filter maps' learning rate over the networks': their values start at unit scale, where Adam's steps of the
#: networks' rate would leave them near their random start for the whole run
FILTER_LR_FACTOR = 100.0
#: the covariance filters' split-half reproducibility (``split_reproducibility``, standard deviations) from which
#: their leading direction counts as the particles' (noise alone: about 0); below it a learnt bank beside them
#: (``learnt_filters``) is read
REPRODUCIBLE = 3.0
#: ``filters_from`` value: the filters are estimated from the particles' covariance (``filter_covariance``)
COVARIANCE = "covariance"


class Encoder(nn.Module):
    """Image features (B, in_dim) -> (mu, logvar), each (B, zdim)."""

    def __init__(self, in_dim: int, zdim: int, layers: int, dim: int, activation: str = "relu"):
        super().__init__()
        self.zdim = zdim
        self.mlp = ResidMLP(in_dim, layers, dim, 2 * zdim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlp(x)
        return out[:, :self.zdim], out[:, self.zdim:]


class AmortisedInference(MarchingObjective, nn.Module):
    """Encoder + volume, trained on the ELBO. ``settings``: enc_layers, enc_dim.

    The volume is the neural one of ``volume_cfg``, or ``decoder``: any ``SliceModel`` with a ``latent_dim`` (its
    own parameters kept as they are; ``volume_cfg`` is then None and ``settings`` may hold ``seed``). ``poses``:
    per-particle pose corrections trained with the model (``pose_tables``); the encoder sees the images as
    given. ``march``: the share of the epochs spent widening the fitted circle (frequency marching,
    ``freq_march.py``)."""

    kind = "amortised"

    def __init__(self, volume_cfg: Any, points: Points, settings: dict[str, Any], beta: float = 0.0,
                 decoder: nn.Module | None = None, poses: PoseCorrections | None = None, march: float = 0.0,
                 beta_warmup: int = 0):
        super().__init__()
        seed = int(volume_cfg.seed) if volume_cfg is not None else int(settings.get("seed", 0))
        zdim = volume_cfg.zdim if decoder is None else int(decoder.latent_dim)
        g = torch.Generator().manual_seed(seed)
        self.settings = {"kind": self.kind, "enc_layers": int(settings["enc_layers"]),
                         "enc_dim": int(settings["enc_dim"])}
        self.residual_input = settings.get("encoder_input", "image") == "residual"
        if self.residual_input:  # stored only when not the default, so older checkpoints compare equal
            if volume_cfg is None or not volume_cfg.anchor:
                raise ValueError("--encoder_input residual needs the decoder anchored (--anchor homogeneous)")
            self.settings["encoder_input"] = "residual"
        n_filters, self.filters = int(settings.get("encoder_filters", 0)), None
        if n_filters:  # stored only when used, as encoder_input
            if volume_cfg is None:
                raise ValueError("pose-aware encoder filters need a neural volume (its box)")
            freq, fixed = float(settings["filter_freq"]), str(settings.get("filters_from", ""))
            self.settings.update(encoder_filters=n_filters, filter_freq=freq, **({"filters_from": fixed} if fixed
                                                                                 else {}))
            if fixed == COVARIANCE and not self.residual_input:
                raise ValueError("--filters_from covariance needs the residual (--anchor homogeneous)")
            self.filters = PoseFilterBank(n_filters, volume_cfg.box, points.kxy, points.weight, freq, g,
                                          fixed=bool(fixed))
        n_learnt, self.learnt = int(settings.get("learnt_filters", 0)), None
        if n_learnt:  # stored only when used
            if self.filters is None or self.settings.get("filters_from") != COVARIANCE:
                raise ValueError("learnt filters beside fixed ones need the covariance filters (--filters_from "
                                 "covariance)")
            learnt_freq = float(settings["learnt_filter_freq"])
            self.settings.update(learnt_filters=n_learnt, learnt_filter_freq=learnt_freq)
            self.learnt = PoseFilterBank(n_learnt, volume_cfg.box, points.kxy, points.weight, learnt_freq, g)
            with torch.no_grad():  # zero responses: the encoder starts as the fixed filters' alone
                self.learnt.values.zero_()
            # 1: the bank is read; 0: its responses are held at zero (the covariance's leading direction reproduces)
            self.register_buffer("learnt_used", torch.ones(()))
        self.encoder = Encoder(n_filters + n_learnt or 2 * len(points), zdim, self.settings["enc_layers"],
                               self.settings["enc_dim"],
                               volume_cfg.activation if volume_cfg is not None else "relu")
        if decoder is None:
            self.decoder = NeuralVolume(volume_cfg, g)
            init_linear(self, g)  # encoder first, then decoder: layers drawn from the seed in a fixed order
        else:
            self.decoder = decoder
            init_linear(self.encoder, g)
        self.poses = poses
        if poses is not None:
            self.settings["poses"] = poses.settings
        self.register_buffer("kxy", points.kxy, persistent=False)
        self.noise_dim, self.beta, self.beta_warmup = zdim, beta, int(beta_warmup)
        self.kl_weight = kl_weight(beta, zdim, len(points))
        max_freq = volume_cfg.max_freq if volume_cfg is not None else float(points.kxy.norm(dim=-1).max())
        self.march, self.fit_radius = FrequencyMarch(points.kxy, max_freq, march), max_freq

    def inputs(self, b: ImageBatch) -> dict[str, torch.Tensor]:
        """Loss inputs of a prepared batch (runs in the loader thread); no encoder image with the residual input
        or the filters, which :meth:`encode` forms on the device."""
        return loss_inputs(b, encoder_image=not (self.residual_input or self.filters is not None))

    def encode(self, d: dict[str, torch.Tensor], base: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | image) from the image, or (``encoder_input`` residual) from the residual of the image and the
        anchored base map's CTF-weighted slice at its pose, which leaves the encoder the heterogeneity and the
        noise instead of a pose-dependent projection of the consensus. The encoder reads that signal
        phase-flipped, pixel by pixel (cryoDRGN's encoder), or, with ``encoder_filters``, as its responses to
        3-D filter maps sliced at the image's pose (``pose_filters``), with ``learnt_filters`` a learnt bank's too
        (zeros where it is not read). ``base``: the base map's slices at the batch's poses when already
        computed."""
        if not self.residual_input and self.filters is None:
            return self.encoder(d["enc"])
        signal = d["y"]
        if self.residual_input:
            with torch.no_grad():
                if base is None:
                    base = self.decoder.base_slices(d["rot"], self.kxy)
                signal = signal - base * d["ctf"][..., None]
        if self.learnt is not None:
            learnt = self.learnt(d["rot"], d["ctf"], signal) * self.learnt_used  # no host sync to decide
            return self.encoder(torch.cat([self.filters(d["rot"], d["ctf"], signal), learnt], 1))
        if self.filters is not None:
            return self.encoder(self.filters(d["rot"], d["ctf"], signal))
        return self.encoder((signal * torch.sign(d["ctf"])[..., None]).reshape(len(signal), -1))

    def forward(self, d: dict[str, torch.Tensor], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = None
        if self.residual_input:  # the base map's slices serve the residual and the decoder's output alike
            with torch.no_grad():
                base = self.decoder.base_slices(d["rot"], self.kxy)
        mu, logvar = self.encode(d, base)
        rot, y = posed(self.poses, d, self.kxy)
        if self.poses is not None:  # the decoder's slices are at the corrected poses
            base = None
        kxy, y, ctf = restrict(self.active, self.kxy, y, d["ctf"])
        if base is not None and self.active is not None:
            base = base[:, self.active]
        return gaussian_elbo(self.decoder, kxy, rot, y, ctf, mu, logvar, eps, base)

    @torch.no_grad()
    def initialise(self, n_particles: int, stream: Callable[[np.ndarray], Iterable[dict[str, torch.Tensor]]],
                   reduce: Callable[[torch.Tensor], torch.Tensor], seed: int, log: Any) -> None:
        """Before a new run's first epoch: with ``filters_from`` covariance, the filters are the leading
        eigenvectors of the residuals' covariance (``filter_covariance``) over at most ``COVARIANCE_PARTICLES``
        particles drawn from ``seed``, against the whole homogeneous map (the base is a fraction of it).
        ``stream(rows)``: the prepared batches (``inputs``, on the device, and their ``rows``) of this rank's share
        of ``rows``. A learnt bank beside the covariance filters (``learnt_filters``) is read from then on only if
        their leading direction does not reproduce across the two halves of the particles (below
        ``REPRODUCIBLE``): then they hold the noise, and the learnt maps may find what they miss."""
        if self.filters is None or self.settings.get("filters_from") != COVARIANCE:
            return
        t0 = time.perf_counter()
        rows = np.sort(np.random.default_rng([seed, 53]).permutation(n_particles)[:COVARIANCE_PARTICLES])
        full = 1.0 / self.decoder.cfg.anchor_fraction

        def signals() -> Iterable[tuple[torch.Tensor, ...]]:
            for d in stream(rows):
                base = self.decoder.base_slices(d["rot"], self.kxy) * full
                yield d["rot"], d["ctf"], d["y"] - base * d["ctf"][..., None], d["rows"]

        values, shell_snr, repro = covariance_filters(self.filters, signals, self.filters.n_filters, reduce, seed)
        self.filters.values.copy_(values)
        log.info("encoder: %d filters from the covariance of %d particles' residuals (%d passes, %.1f s); %s; "
                 "their leading direction's variance in one half of the particles is %.1f s.d. above a random "
                 "direction's in the other half (noise alone: about 0)", self.filters.n_filters, len(rows),
                 POWER_PASSES, time.perf_counter() - t0,
                 signal_extent(shell_snr, self.decoder.cfg.box * self.decoder.cfg.apix), repro)
        if self.learnt is not None:
            self.learnt_used.fill_(float(repro < REPRODUCIBLE))
            log.info("encoder: the %d learnt filter maps beside them are %s", self.learnt.n_filters,
                     f"read (the covariance's leading direction is below {REPRODUCIBLE:g} s.d.: noise)"
                     if repro < REPRODUCIBLE else "not read: the covariance filters hold a reproducible change")

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The networks at ``lr``, learnt filter maps (of either bank) at ``FILTER_LR_FACTOR`` times it."""
        maps = [p for bank in (self.filters, self.learnt) if bank is not None for p in bank.parameters()]
        if not maps:
            return [{"params": list(self.parameters()), "lr": lr}]
        fil = set(map(id, maps))
        return [{"params": [p for p in self.parameters() if id(p) not in fil], "lr": lr},
                {"params": maps, "lr": lr * FILTER_LR_FACTOR}]

    @torch.no_grad()
    def latents(self, batches: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, mu, logvar) of the particles in ``batches`` (loader batches whose data are :meth:`inputs`)."""
        was = self.training
        self.eval()
        rows, outs = [], []
        for batch in batches:
            mu, logvar = self.encode({k: v.to(device) for k, v in batch.data.items()})
            outs.append(torch.cat([mu.float(), logvar.float()], 1).cpu())
            rows.append(np.asarray(batch.rows))
        self.train(was)
        d = self.noise_dim
        out = torch.cat(outs).numpy() if outs else np.zeros((0, 2 * d), np.float32)
        return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), out[:, :d], out[:, d:]
