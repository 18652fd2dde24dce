"""Per-particle goodness of fit: how well each image is explained by its method's model at its pose, CTF and latent.

Any method hands in its model's prediction for a batch of prepared particles (a ``Predictor``: the central slices
without CTF at the working lattice's half-plane pixels, for the batch's rows, rotations and latents); on the
half-plane of Fourier pixels (DC left out, every pixel a complex Gaussian independent of the others)

    X_i(k) = a · CTF_i(k) · P_i(k) + n_i(k),   E|n_i(k)|² = σ²(|k|),

with one scale ``a`` for the data set (the images' normalisation against the model's) and σ² per shell. Both come
robustly from a fixed sample of particles, so that junk does not inflate them: ``a`` is the median over the
sample of each image's least-squares scale, σ²(shell) the median over the sample of each image's mean residual
power in that shell, divided by the median of a Gamma(n, 1)/n variable (n the shell's pixels: the mean of n
exponential |n(k)|²/σ² terms), so that it is unbiased for pure noise. Then, streamed over every particle:

* ``fit_z`` (STAR ``cryohetFitZ``): how much less evidence for its particle the model finds in the image than a
  typical particle gives. The evidence is the log-likelihood ratio of "this particle, as modelled" against "no
  particle here", L = Σ (|X|² − |R|²)/σ² with R = X − a·CTF·P the residual; a typical particle at this pose and
  CTF gives on average S = Σ |a·CTF·P_ref|²/σ², its reference image's power in noise units (P_ref: the method's
  reference image, e.g. its consensus or mean map; by default the particle's own model image; its power scaled so
  that the sample's median particle gets L = S, as the reference may be weaker, a mean over junk too), with s.d.
  √(2S). So fit_z = (S − L)/√(2S): N(0, 1) for particles the model explains as well as a typical one, about +√(S/2) or
  more for an image without that signal (pure noise, another molecule, a particle off its recorded centre, a
  conformation the model does not hold). Without a reference it is −2 Re⟨R, a·CTF·P⟩_σ/√(2S), the residual along
  the model's image; the reference matters for models that can explain an empty image with an empty prediction
  (a latent that scales the map down), which the residual alone would call a good fit.
* ``residual_z`` (STAR ``cryohetResidualZ``): the whole residual's χ² = Σ |R|²/σ² as a z-score against pure
  noise, (χ² − M)/√M for M pixels: large for junk whose residual is orthogonal to the model (contamination,
  images brighter than the model).

Both are positive for a poor fit; cut on them with ``cryohet select --max_fit_z``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaincinv

from cryohet.data.loader import BatchStream
from cryohet.data.prepare import ImageBatch, ImagePreparer, sample_rows
from cryohet.geometry.lattice import Lattice, Points
from cryohet.geometry.project import ProjectorStack
from cryohet.inference.trainer import autocast_for

#: (prepared batch, (M, 2) pixel frequencies in cycles/pixel of the working lattice) -> (B, M) complex slices of
#: the model at each particle's pose and latent, without CTF, in the units of the prepared transforms.
Predictor = Callable[[ImageBatch, torch.Tensor], torch.Tensor]

#: STAR columns written by ``fit_columns``.
FIT_Z, RESIDUAL_Z = "cryohetFitZ", "cryohetResidualZ"


@dataclass
class NoiseFit:
    """Scale of the images against the model and σ² per shell (index = rounded radius in pixels)."""

    scale: float
    sigma2: np.ndarray      # (n_shells,) float64; shells without pixels hold 1
    n_sample: int
    reference_scale: float = 1.0  # median over the sample of evidence / reference power (a typical particle's)


@dataclass
class FitScores:
    """Per-particle goodness of fit (rows in particle-file order) and the noise model it used."""

    fit_z: np.ndarray        # (N,) float64
    residual_z: np.ndarray   # (N,) float64
    signal: np.ndarray       # (N,) S: the reference image's power in noise units
    noise: NoiseFit


def shell_sums(X: torch.Tensor, P: torch.Tensor, P_ref: torch.Tensor, shell: torch.Tensor,
               n_shells: int) -> torch.Tensor:
    """Per image and shell the sums of |X|², Re(conj(P)·X), |P|² and |P_ref|² -> (B, n_shells, 4) float64."""
    vals = torch.stack([X.abs() ** 2, (P.conj() * X).real, P.abs() ** 2, P_ref.abs() ** 2], -1).to(torch.float64)
    out = torch.zeros(len(X), n_shells, 4, dtype=torch.float64, device=X.device)
    return out.index_add_(1, shell.to(X.device), vals)


def fit_noise(sums: torch.Tensor, counts: torch.Tensor, n_iter: int = 3) -> NoiseFit:
    """Robust scale and σ² per shell from the shell sums (B, S, 4) of a sample of images (see the module text)."""
    used = counts > 0
    n = counts.clamp_min(1)
    # median of Gamma(n, 1)/n: the median of an unbiased σ² estimate from n exponential terms, relative to σ²
    med = torch.as_tensor(gammaincinv(counts.clamp_min(1).numpy(), 0.5), dtype=torch.float64) / n
    xx, xp, pp, _ = sums.unbind(-1)
    scale = 0.0
    sigma2 = torch.where(used, (xx / n).median(0).values / med, torch.ones_like(n))
    for _ in range(n_iter):
        w = used / sigma2
        per_image = (xp * w).sum(1) / (pp * w).sum(1).clamp_min(1e-30)
        scale = float(per_image.median())
        resid = (xx - 2 * scale * xp + scale**2 * pp).clamp_min(0) / n
        floor = 1e-6 * float((xx / n)[:, used].median())  # noise-free data: keep σ² positive
        sigma2 = torch.where(used, (resid.median(0).values / med).clamp_min(floor), torch.ones_like(n))
    noise = NoiseFit(scale, sigma2.numpy(), len(sums))
    w = used / sigma2
    evidence = ((2 * scale * xp - scale**2 * pp) * w).sum(1)
    reference = (scale**2 * sums[..., 3] * w).sum(1)
    ok = reference > 0
    if ok.any():
        noise.reference_scale = max(float((evidence[ok] / reference[ok]).median()), 1e-6)
    return noise


def scores_from_sums(sums: torch.Tensor, counts: torch.Tensor, noise: NoiseFit) -> tuple[torch.Tensor, ...]:
    """(fit_z, residual_z, S) per image from its shell sums (B, S, 4) under ``noise`` (``counts`` per shell on the
    host; the results on the sums' device)."""
    a = noise.scale
    inv = ((counts > 0) / torch.as_tensor(noise.sigma2, dtype=torch.float64)).to(sums.device, non_blocking=True)
    xx, xp, pp, rr = sums.unbind(-1)
    chi2 = ((xx - 2 * a * xp + a**2 * pp) * inv).sum(1)
    m = float(counts.sum())
    signal = noise.reference_scale * (a**2 * rr * inv).sum(1)
    evidence = ((2 * a * xp - a**2 * pp) * inv).sum(1)  # Σ (|X|² − |R|²)/σ²
    fit_z = torch.where(signal > 0, (signal - evidence) / (2 * signal).clamp_min(1e-30).sqrt(),
                        torch.zeros_like(signal))
    return fit_z, (chi2 - m) / math.sqrt(m), signal


def _predicted_sums(stream: Iterable[ImageBatch], predict: Predictor, reference: Predictor | None, points: Points,
                    n_shells: int, amp: Callable[[], AbstractContextManager]
                    ) -> Iterable[tuple[np.ndarray, torch.Tensor]]:
    """(rows, shell sums (B, S, 4) on the batch's device) per batch: no host synchronisation."""
    with torch.no_grad():
        for b in stream:
            with amp():
                P = predict(b, points.kxy)
                R = None if reference is None else reference(b, points.kxy)
            P = b.ctf * P.to(b.images_ft.device, torch.complex64)
            R = P if R is None else b.ctf * R.to(b.images_ft.device, torch.complex64)
            yield b.rows, shell_sums(b.images_ft, P, R, points.shell, n_shells)


def score_particles(particles, predict: Predictor, reference: Predictor | None = None, box: int | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 256, n_sample: int = 2000, seed: int = 0,
                    progress: Callable | None = None, amp: str = "no", max_freq: float = 0.5) -> FitScores:
    """Goodness of fit of every particle of ``particles`` (a ParticleSet with poses and CTF) under ``predict``,
    against a typical particle's evidence under ``reference`` (None: ``predict`` itself).

    ``box``: the working lattice (the images Fourier-cropped to it; the model's box; None: the images' box);
    ``max_freq``: the scored circle's radius, cycles/pixel of that lattice (the model's fitted circle; 0.5: Nyquist).
    The noise model comes from a fixed sample of ``n_sample`` particles (drawn from ``seed``; their per-shell sums
    are kept: 4 numbers per shell each), then every other particle is streamed once in file order through the
    loader, ``batch_size`` at a time; the scores stay on the device until the end. ``amp``: the predictors run
    under the trainer's mixed precision (``autocast_for``: auto, yes, no; bfloat16 moves cryohetFitZ by a few
    hundredths of a noise s.d.).
    """
    lattice = Lattice(int(particles.box), float(particles.apix))
    if box is not None and box != lattice.box:
        lattice = lattice.cropped(int(box))
    points = lattice.half_plane(max_freq * lattice.box)
    n_shells = lattice.box // 2 + 1
    counts = torch.bincount(points.shell, minlength=n_shells).to(torch.float64)
    prep = ImagePreparer(particles, lattice, points=points, device=device)
    reader = particles.reader()
    n = len(particles)
    amp_ctx, _ = autocast_for(torch.device(device), amp)

    def sums_of(rows: np.ndarray, desc: str) -> Iterable[tuple[np.ndarray, torch.Tensor]]:
        batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
        stream = BatchStream(reader, batches, prep, prefetch=2)
        stream = progress(stream, desc, len(batches)) if progress is not None else stream
        return _predicted_sums(stream, predict, reference, points, n_shells, amp_ctx)

    sample = sample_rows(n, n_sample, seed, 0xF17)
    scored = list(sums_of(sample, "goodness of fit: noise model"))
    noise = fit_noise(torch.cat([s for _, s in scored]).cpu(), counts)
    rest = np.setdiff1d(np.arange(n), sample)  # the sample's sums are kept: each particle is scored once
    out = torch.zeros((3, n), dtype=torch.float64, device=prep.device)
    for rows, sums in itertools.chain(scored, sums_of(rest, "goodness of fit") if len(rest) else ()):
        idx = torch.from_numpy(rows).to(prep.device, non_blocking=True)
        out[:, idx] = torch.stack(scores_from_sums(sums, counts, noise))
    fit_z, residual_z, signal = out.cpu().numpy()
    return FitScores(fit_z, residual_z, signal, noise)


def maps_predictor(maps: torch.Tensor, coefficients: np.ndarray | None = None) -> Predictor:
    """The model image of a linear combination of maps per particle: Σ_k c_ik · V_k at the particle's pose.

    ``maps`` (K, box, box, box) or one map (box, box, box) on the device to slice on; ``coefficients`` (N, K) per
    particle row (None: every particle is the first map: a consensus map; one-hot rows: a class per particle;
    (1, z_i) rows with a mean and components: principal volumes). One interpolation pass slices every map.
    """
    stack = ProjectorStack(maps[None] if maps.ndim == 3 else maps)
    coef = None if coefficients is None else torch.as_tensor(np.array(coefficients, dtype=np.float32))
    if coef is not None and coef.shape[1] != len(stack):
        raise ValueError(f"{coef.shape[1]} coefficients per particle for {len(stack)} maps")

    def predict(b: ImageBatch, kxy: torch.Tensor) -> torch.Tensor:
        slices = stack.slice_points(b.rotations, kxy)  # (K, B, M)
        if coef is None:
            return slices[0]
        c = coef[torch.as_tensor(b.rows)].to(slices.device)
        return torch.einsum("kbm,bk->bm", slices, c.to(slices.dtype))

    return predict


def latent_predictors(model, z: np.ndarray) -> tuple[Predictor, Predictor]:
    """(each particle's image, a typical particle's image) of a ``SliceModel`` (``model.slices``): its slices at
    each particle's latent ``z`` (N, d) (rows in particle-file order), and at the latents' median, a point in the
    bulk of the particles (junk is pushed to the latent space's edges)."""
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    z = np.asarray(z, dtype=np.float32)
    z_dev = torch.as_tensor(z, device=device)  # on the device once: no copy per batch
    typical = torch.as_tensor(np.median(z, axis=0), device=device)

    def at(latents: Callable[[ImageBatch], torch.Tensor]) -> Predictor:
        def predict(b: ImageBatch, kxy: torch.Tensor) -> torch.Tensor:
            out = model.slices(b.rotations.to(device), latents(b), kxy.to(device)).float()
            return torch.complex(out[..., 0], out[..., 1])
        return predict

    return (at(lambda b: z_dev[torch.from_numpy(b.rows).to(device, non_blocking=True)]),
            at(lambda b: typical.expand(len(b.rows), -1)))
