"""Pose re-search against a conformational model: every image scored against the model's slice at its own latent.

A heterogeneous model has no single reference map, so the search of :mod:`cryohet.inference.pose_search` (slices
of one map) cannot be used. :class:`DecoderScorer` evaluates the decoder itself on the rotated half-plane
frequencies of each candidate rotation at the image's latent z (cryoDRGN2's search against V(z, ·)), and offers
the ``score`` / ``device`` interface that :func:`~cryohet.inference.pose_search.local_search` needs, so the same
shrinking-grid search refines rotations and origins. The score is the Gaussian log-likelihood under white noise,

    −Σ_k |X_k(s) − CTF_k · V(z, Aᵀk)|²,

over the half-plane pixels below a band limit (the images and the decoder on the data scale the model was
trained with). A decoder evaluation per (image, rotation, pixel) is what the search costs, so it scores a low
band limit: ``research_poses`` streams the particles in batches and the decoder is called on at most ``chunk``
(rotation, pixel) pairs at once, so memory depends on neither the number of particles nor the batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.geometry.euler import matrix_to_euler
from cryohet.geometry.lattice import Lattice
from cryohet.inference.pose_search import angle_between_deg, local_search
from cryohet.inference.trainer import autocast_for


class DecoderScorer:
    """Log-likelihoods of pose hypotheses of images (B, M) against ``decoder``'s slices at their latents ``z``.

    ``decoder``: any volume model with ``slices(rot (R, 3, 3), z (R, d), kxy (M, 2)) -> (R, M, 2)`` (real and
    imaginary parts; NeuralVolume). ``kxy`` (M, 2): the scored pixels' frequencies, cycles/pixel of the images'
    lattice. ``amp``: a mixed-precision context for the decoder's evaluations. ``chunk``: most (slice × pixel)
    decoder evaluations per call (memory ~ chunk × the decoder's width).
    """

    def __init__(self, decoder: nn.Module, z: torch.Tensor, kxy: torch.Tensor,
                 amp: Callable[[], AbstractContextManager] = nullcontext, chunk: int = 1 << 17):
        self.decoder, self.amp, self.chunk = decoder, amp, int(chunk)
        self.device = kxy.device
        self.z, self.kxy = z.to(self.device, torch.float32), kxy.to(torch.float32)

    @torch.no_grad()
    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        """The model's slices (B, H, M) complex at rotations (B, H, 3, 3), image b at latent z[b]."""
        B, H = rotations.shape[:2]
        M = self.kxy.shape[0]
        A = rotations.reshape(B * H, 3, 3).to(self.device, torch.float32)
        z = self.z.repeat_interleave(H, 0)
        step = max(1, self.chunk // M)
        with self.amp():  # only the decoder: phases and sums stay in float32
            out = torch.cat([self.decoder.slices(A[i:i + step], z[i:i + step], self.kxy).float()
                             for i in range(0, B * H, step)])
        return torch.complex(out[..., 0], out[..., 1]).reshape(B, H, M)

    @torch.no_grad()
    def score(self, images_ft: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
              shifts_px: torch.Tensor) -> torch.Tensor:
        """(B, H, S) −|X(s) − CTF · V(z, Aᵀk)|² of rotations (B, H, 3, 3) × further origins (B, S, 2) in pixels
        (RELION's sign, as ``undo_origin``); ``images_ft`` (B, M) complex and ``ctf`` (B, M) at the pixels."""
        x = images_ft.to(self.device, torch.complex64)
        c = ctf.to(self.device, torch.float32)
        phase = -2 * math.pi * shifts_px.to(self.device, torch.float32) @ self.kxy.T  # (B, S, M)
        xs = x[:, None, :] * torch.polar(torch.ones_like(phase), phase)
        P = self.slices(rotations) * c[:, None, :]  # (B, H, M)
        cross = torch.einsum("bhm,bsm->bhs", P, xs.conj()).real
        pp = (P.real ** 2 + P.imag ** 2).sum(-1)
        xx = (x.real ** 2 + x.imag ** 2).sum(-1)
        return 2 * cross - pp[..., None] - xx[:, None, None]


@dataclass
class ResearchSettings:
    """A local re-search around the current poses (angles in degrees, origins in Å)."""

    max_angle_deg: float = 8.0    # rotations within this geodesic angle of the current one
    max_shift_A: float = 4.0      # origins within this distance of the current one
    rounds: int = 4               # shrinking-grid rounds (the last step is max / 2^rounds)
    band_limit_A: float = 0.0     # score frequencies below 1 / this (0: the model's whole resolution circle)
    amp: str = "auto"             # decoder in mixed precision: auto (CUDA, CPUs with bfloat16), yes, no
    batch_size: int = 64


@dataclass
class ResearchResult:
    euler_deg: np.ndarray         # (N, 3) RELION Euler angles
    shift_A: np.ndarray           # (N, 2) origins, Å
    moved_deg: np.ndarray         # (N,) angle between the old and the new rotation
    gain: np.ndarray              # (N,) log-likelihood gained over the old pose


def research_poses(pset, decoder: nn.Module, z: np.ndarray, lattice: Lattice, data_scale: float,
                   settings: ResearchSettings, device: torch.device, window_radius: float = 0.0,
                   track: Callable[[Iterable, str, int], Iterable] | None = None) -> ResearchResult:
    """Refine every particle's pose (``pset.euler_deg``, ``pset.shift_A``) against ``decoder`` at its latent ``z``
    (N, d) by ``local_search``, on ``lattice`` (the model's: the images Fourier-cropped to its box) below the band
    limit; the images are prepared as for training (origins undone, the soft window of ``window_radius``, divided
    by ``data_scale``)."""
    s = settings
    radius_px = lattice.box / 2 if s.band_limit_A <= 0 else min(lattice.box / 2,
                                                                 lattice.box * lattice.apix / s.band_limit_A)
    radius_px = min(radius_px, decoder.cfg.max_freq * lattice.box) if hasattr(decoder, "cfg") else radius_px
    points = lattice.half_plane(radius_px)
    kxy = points.kxy.to(device)
    zt = torch.as_tensor(np.asarray(z, dtype=np.float32))
    was = decoder.training
    decoder.eval()
    amp_ctx, _ = autocast_for(device, s.amp)
    try:
        return research_with(pset, lambda rows: DecoderScorer(decoder, zt[rows], kxy, amp_ctx), lattice, s,
                             device, ImagePreparer(pset, lattice, points, window_radius, data_scale, device),
                             track)
    finally:
        decoder.train(was)


def research_with(pset, scorer_for: Callable[[np.ndarray], DecoderScorer], lattice: Lattice,
                  settings: ResearchSettings, device: torch.device, prep: ImagePreparer,
                  track: Callable[[Iterable, str, int], Iterable] | None = None) -> ResearchResult:
    """``local_search`` of every particle's pose in batches streamed through ``prep`` (images on ``lattice``),
    each batch scored by ``scorer_for(rows)`` (anything with ``DecoderScorer.score``'s signature): the loop
    shared by the decoder's re-search and the principal volumes'."""
    s = settings
    N = len(pset)
    euler, shift = np.array(pset.euler_deg, dtype=np.float64), np.array(pset.shift_A, dtype=np.float64)
    moved, gain = np.zeros(N), np.zeros(N)
    rows = [np.arange(r0, min(N, r0 + s.batch_size)) for r0 in range(0, N, s.batch_size)]
    stream: Iterable[ImageBatch] = BatchStream(pset.reader(), rows, prep, prefetch=2)
    if track is not None:
        stream = track(stream, "pose re-search", len(rows))
    for b in stream:
        scorer = scorer_for(b.rows)
        A0 = b.rotations.to(device)
        zero = torch.zeros(len(b.rows), 2, device=device)
        before = scorer.score(b.images_ft, b.ctf, A0[:, None], zero[:, None])[:, 0, 0]
        found = local_search(scorer, b.images_ft, b.ctf, A0, zero, s.max_angle_deg, s.max_shift_A / lattice.apix,
                             s.rounds)
        euler[b.rows] = matrix_to_euler(found.rotations.double().cpu().numpy())
        # a further origin s (px) undone after the current one: the origins add
        shift[b.rows] += found.shifts_px.double().cpu().numpy() * lattice.apix
        moved[b.rows] = angle_between_deg(A0, found.rotations).cpu().numpy()
        gain[b.rows] = (found.score - before).cpu().numpy()
    return ResearchResult(euler, shift, moved, gain)
