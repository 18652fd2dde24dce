"""Log-likelihood of every particle image under every frame of an ensemble (known poses and CTF).

Model of image i under frame f, on the half-plane of Fourier pixels inside the resolution circle of a working
lattice (the images Fourier-cropped so that Nyquist reaches ``resolution_A``):

    X_i(k) = a · CTF_i(k) · F_f(A_iᵀ k) + n_i(k),   n_i(k) complex Gaussian, E|n(k)|² = σ²(|k|)

F_f the transform of frame f's map (its atoms rendered as ``gaussian_map`` does, at ``resolution_A``), A_i the
particle's pose, the origin undone (``ImagePreparer``). Half-plane pixels are independent (the other half is
their complex conjugates), so

    log L_if = −Σ_k |X_i(k) − a CTF_i(k) F_f(A_iᵀ k)|² / σ²(|k|) − Σ_k log(π σ²(|k|)).

The amplitude ``a`` (the images' scale against the maps': normalisation, detector gain) is one number for the
data set, or (``per_image``) fitted per image and frame in closed form, a_if = max(c, 0) / p with
c = Σ Re(conj(CTF·F) X)/σ² and p = Σ |CTF·F|²/σ² (then log L_if = −Σ |X|²/σ² + max(c, 0)²/p − Σ log πσ²).

Noise and scale come from the data (:func:`estimate_noise`): on a sample of the particles, each image is matched
to the frame whose projection correlates best with it, and the shell sums of |X|², Re(conj(CTF·F) X) and |CTF·F|²
against that frame give, in closed form, the global scale (least squares, whitened by σ²) and σ²(shell), the
mean residual power per pixel (iterated twice). The residual against the best of F frames is biased low by about
one parameter per image out of the M pixels fitted: negligible (M is hundreds to thousands).

The N × F matrix is written into a memory-mapped .npy, chunk by chunk, with a checkpoint (the rows done) after
each chunk, so host memory does not grow with N and a killed pass resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.data.loader import BatchStream, Progress
from cryohet.data.prepare import ImageBatch, ImagePreparer
from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.geometry.gaussians import gaussian_map
from cryohet.geometry.lattice import Lattice, Points, box_for_resolution
from cryohet.geometry.project import ProjectorStack
from cryohet.io.atomic_model import box_centre_A

CHECKPOINT_FORMAT = "cryohet-reweight-loglik-1"
#: Frames sliced in one interpolation pass (bounds the (frames, batch, pixels) arrays).
FRAME_GROUP = 32


@dataclass
class NoiseModel:
    """The images' amplitude against the frames' maps and the noise power per shell of the working lattice."""

    scale: float               # a (global); with per-image scales the data set's value, for reference
    noise_var: list[float]     # σ² per shell (rounded radius in pixels of the working lattice)
    n_images: int              # images it was estimated from


def working_lattice(box: int, apix: float, resolution_A: float) -> tuple[Lattice, float]:
    """The lattice the images are scored on (cropped so that Nyquist reaches ``resolution_A``) and the radius
    (pixels) of the resolution circle on it."""
    lattice = Lattice(box, apix).cropped(box_for_resolution(box, apix, resolution_A))
    return lattice, min(lattice.box / 2, lattice.box * lattice.apix / resolution_A)


def frame_maps(xyz_A: np.ndarray, weight: np.ndarray, box: int, apix: float, resolution_A: float,
               new_box: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Maps (F, n, n, n) of the frames ``xyz_A`` (F, N, 3) Å in the particles' map frame: rendered on the images'
    ``box`` at ``apix`` (centre ``box_centre_A``), Fourier-cropped to ``new_box`` (voxel values kept)."""
    centre = box_centre_A(box, apix)
    out = []
    for xyz in xyz_A:
        v = torch.from_numpy(gaussian_map(xyz, weight, box, apix, resolution_A, centre, device)).to(device)
        out.append(fourier_crop_3d(v, new_box or box).to(torch.float32))
    return torch.stack(out)


class FrameScorer:
    """Projections of every frame at each image's pose, times its CTF, on ``points``."""

    def __init__(self, maps: torch.Tensor, points: Points):
        self.stacks = [ProjectorStack(maps[s:s + FRAME_GROUP]) for s in range(0, len(maps), FRAME_GROUP)]
        self.points = points
        self.n_frames = len(maps)

    def model_groups(self, b: ImageBatch) -> Iterable[tuple[int, torch.Tensor]]:
        """(first frame, CTF·F_f(Aᵀk) (G, B, M)) for each group of frames."""
        start = 0
        for stack in self.stacks:
            yield start, b.ctf[None] * stack.slice_points(b.rotations, self.points.kxy)
            start += len(stack)


def _shell_sum(values: torch.Tensor, shell: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sums of ``values`` (B, M) per shell -> (n_shells,) float64."""
    return torch.zeros(n_shells, dtype=torch.float64, device=values.device).index_add_(
        0, shell, values.sum(0).to(torch.float64))


def estimate_noise(stream: Iterable[ImageBatch], scorer: FrameScorer, n_shells: int) -> NoiseModel:
    """Global scale and σ² per shell from images against their best-correlating frame (see the module's text)."""
    shell = scorer.points.shell
    xx = torch.zeros(n_shells, dtype=torch.float64)
    xp, pp = xx.clone(), xx.clone()
    n = 0
    for b in stream:
        X = b.images_ft
        best_cc = torch.full((len(X),), -math.inf, device=X.device)
        best = torch.zeros_like(X)
        for _, P in scorer.model_groups(b):
            cc = (P.conj() * X).real.sum(-1) / (P.abs() ** 2).sum(-1).clamp_min(1e-30).sqrt()  # (G, B)
            top, arg = cc.max(0)
            take = top > best_cc
            best_cc = torch.where(take, top, best_cc)
            best = torch.where(take[:, None], P[arg, torch.arange(len(X), device=X.device)], best)
        sh = shell.to(X.device)
        xx += _shell_sum(X.abs() ** 2, sh, n_shells).cpu()
        xp += _shell_sum((best.conj() * X).real, sh, n_shells).cpu()
        pp += _shell_sum(best.abs() ** 2, sh, n_shells).cpu()
        n += len(X)
    count = torch.bincount(shell, minlength=n_shells).to(torch.float64) * max(n, 1)
    used = count > 0
    inv = used.to(torch.float64)  # first pass unweighted
    for _ in range(3):
        scale = float((xp * inv).sum() / (pp * inv).sum().clamp_min(1e-30))
        resid = (xx - 2 * scale * xp + scale**2 * pp).clamp_min(0) / count.clamp_min(1)
        floor = 1e-6 * float(xx[used].sum() / count[used].sum())  # noise-free data: keep σ² positive
        var = torch.where(used, resid.clamp_min(floor), torch.ones_like(resid))
        inv = used / var
    return NoiseModel(scale, var.tolist(), n)


def score_batch(b: ImageBatch, scorer: FrameScorer, noise: NoiseModel, per_image: bool) -> torch.Tensor:
    """log L (B, F) float64 of a batch of prepared images under every frame (see the module's text)."""
    var = torch.as_tensor(noise.noise_var, dtype=torch.float64, device=b.images_ft.device)[
        scorer.points.shell.to(b.images_ft.device)]
    inv = (1 / var).to(torch.float32)
    X = b.images_ft
    xx = ((X.abs() ** 2) * inv).sum(-1).double()                  # (B,)
    const = float(torch.log(math.pi * var).sum())
    out = torch.empty((len(X), scorer.n_frames), dtype=torch.float64, device=X.device)
    for start, P in scorer.model_groups(b):
        c = ((P.conj() * X).real * inv).sum(-1).double()           # (G, B)
        p = ((P.abs() ** 2) * inv).sum(-1).double()
        if per_image:
            ll = -xx + c.clamp_min(0) ** 2 / p.clamp_min(1e-30)
        else:
            ll = -xx + 2 * noise.scale * c - noise.scale**2 * p
        out[:, start:start + len(P)] = (ll - const).T
    return out


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_checkpoint(path: Path, digest: str, log: logging.Logger) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        log.warning("--resume: the checkpoint %s cannot be read; starting the likelihood pass afresh", path)
        return None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("digest") != digest:
        log.warning("--resume: the checkpoint %s is of other settings or inputs; starting the likelihood pass "
                    "afresh", path)
        return None
    return state


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(json.dumps(state))


def loglik_matrix(particles: Any, scorer: FrameScorer, lattice: Lattice, out_path: Path, *,
                  per_image: bool = False, noise_particles: int = 2000, batch_size: int = 256,
                  chunk_particles: int = 4096, settings: dict[str, Any] | None = None, resume: bool = False,
                  device: torch.device | str = "cpu", log: logging.Logger | None = None,
                  progress: Progress | None = None) -> tuple[np.ndarray, NoiseModel]:
    """The N × F log-likelihoods of ``particles`` under the frames of ``scorer``, in ``out_path`` (.npy, float32,
    rows in particle-file order), memory-mapped read-only, and the noise model.

    While the pass runs the matrix is ``<out>.partial.npy`` beside a checkpoint ``<out>.checkpoint.json`` (noise
    model, rows done) rewritten after every ``chunk_particles`` rows; ``resume`` continues from it when
    ``settings`` (what the matrix depends on) are the same.
    """
    log = log or logging.getLogger("cryohet")
    track = progress or (lambda items, desc, total: items)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.stem + ".partial.npy")
    ckpt = out_path.with_name(out_path.stem + ".checkpoint.json")
    N, F = len(particles), scorer.n_frames
    digest = _digest({"settings": settings or {}, "N": N, "F": F, "per_image": per_image,
                      "noise_particles": noise_particles, "lattice": [lattice.box, round(lattice.apix, 6)]})
    prep = ImagePreparer(particles, lattice, points=scorer.points, device=device)
    n_shells = lattice.box // 2 + 1

    def stream(rows: np.ndarray, desc: str) -> Iterable[ImageBatch]:
        batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
        return track(BatchStream(particles.reader(), batches, prep, prefetch=2), desc, len(batches))

    state = _read_checkpoint(ckpt, digest, log) if resume else None
    if state is not None and state["rows_done"] >= N and out_path.is_file():
        log.info("--resume: the log-likelihood matrix %s is complete", out_path)
        return np.load(out_path, mmap_mode="r"), NoiseModel(**state["noise"])
    if state is not None and not partial.is_file():
        state = None
    if state is None:
        rows = np.unique(np.linspace(0, N - 1, min(N, noise_particles)).round().astype(np.int64))
        noise = estimate_noise(stream(rows, "noise spectrum and scale"), scorer, n_shells)
        ll = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(N, F))
        done = 0
        _write_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "digest": digest, "rows_done": 0,
                                 "noise": asdict(noise)})
    else:
        noise = NoiseModel(**state["noise"])
        ll = np.load(partial, mmap_mode="r+")
        done = int(state["rows_done"])
        log.info("--resume: %d of %d particles already scored (%s)", done, N, ckpt)
    log.info("noise from %d images: scale %.4g; σ² per shell %s", noise.n_images, noise.scale,
             " ".join(f"{v:.3g}" for v in noise.noise_var[:lattice.box // 2]))
    for start in range(done, N, chunk_particles):
        rows = np.arange(start, min(N, start + chunk_particles))
        for b in stream(rows, f"log-likelihoods of particles {start + 1}-{rows[-1] + 1} of {N}"):
            ll[b.rows] = score_batch(b, scorer, noise, per_image).cpu().numpy()
        ll.flush()
        _write_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "digest": digest, "rows_done": int(rows[-1] + 1),
                                 "noise": asdict(noise)})
    del ll
    partial.replace(out_path)
    return np.load(out_path, mmap_mode="r"), noise
