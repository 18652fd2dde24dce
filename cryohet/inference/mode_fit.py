"""Per-particle normal-mode amplitudes by direct optimisation (HEMNMA class), batched on the device.

For each prepared image (centred transform y, CTF c, RELION rotation A, origins undone) the amplitudes z (and, with
pose correction, a rotation increment ω (radians, axis-angle, A' = R(ω)·A) and a shift s (Å)) minimise

    Σ_k |y_k − s_i · c_k · e^{-2πi k·s} · F_z(A'ᵀk)|²

over the half-plane pixels inside the resolution circle, with s_i ≥ 0 the image's least-squares intensity scale
(in closed form, so the fit is blind to each image's contrast). Adam steps with a cosine-decayed learning rate run
on whole batches at once (every image's loss depends only on its own variables); with several starts, each image
keeps the start of lowest residual. Results stream chunk by chunk into a checkpoint, so a run can resume.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.data.loader import Batch, BatchStream
from cryohet.data.prepare import ImagePreparer, prepared_sample
from cryohet.errors import InputError
from cryohet.geometry.gaussian_slices import complex_mul, shift_phase
from cryohet.geometry.lattice import Points
from cryohet.inference.amortised import loss_inputs
from cryohet.io.reader import ImageReader
from cryohet.models.modes import ModeModel

DIRECT_CHECKPOINT = "direct_checkpoint.npz"


@dataclass
class DirectOptions:
    """How to optimise (none of these changes the model)."""

    iterations: int = 60
    lr_A: float = 0.5               # Adam step of the amplitudes, Å RMS (rotations: lr_A / 50 rad, shifts: lr_A Å)
    starts: int = 1                 # starts per image: 0, then amplitudes drawn N(0, start_sigma_A²)
    start_sigma_A: float = 2.0
    pose_correction: bool = False
    image_scale: bool = False       # each image's own least-squares intensity scale (else the model's)
    batch_size: int = 64
    chunk_images: int = 1024        # particles per checkpoint
    seed: int = 0


@dataclass
class DirectResult:
    amplitudes_A: np.ndarray        # (N, K) Å RMS, rows in particle-file order
    rotation_deg: np.ndarray        # (N, 3) axis-angle rotation increment, degrees (zeros without correction)
    shift_A: np.ndarray             # (N, 2) extra content shift, Å (x, y)
    residual: np.ndarray            # (N,) final residual over the image's own power, in [0, 1]
    seconds: float                  # time spent fitting (this run, not counting resumed chunks)


def axis_angle_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) of axis-angle vectors ``omega`` (B, 3) radians (Rodrigues, smooth at 0)."""
    theta2 = (omega ** 2).sum(-1, keepdim=True)[..., None]
    K = torch.zeros(omega.shape[0], 3, 3, dtype=omega.dtype, device=omega.device)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -omega[:, 2], omega[:, 1], -omega[:, 0]
    K = K - K.transpose(1, 2)
    theta = torch.sqrt(theta2 + 1e-12)
    a = torch.sin(theta) / theta
    b = (1 - torch.cos(theta)) / (theta2 + 1e-12)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def scaled_residual(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ|s·pred − y|² per image (B,) with s ≥ 0 the least-squares scale; ``pred``, ``y`` (B, M, 2)."""
    py = (pred * y).sum((1, 2))
    pp = (pred * pred).sum((1, 2)).clamp_min(1e-30)
    s = (py / pp).clamp_min(0.0)
    return (y * y).sum((1, 2)) - 2 * s * py + s * s * pp


def fit_batch(model: ModeModel, kxy: torch.Tensor, data: dict[str, torch.Tensor], opts: DirectOptions,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(amplitudes (B, K), rotation increments (B, 3) rad, shifts (B, 2) Å, relative residual (B,)) of one batch
    of ``amortised.loss_inputs`` on the model's device."""
    y, ctf, rot = data["y"], data["ctf"], data["rot"]
    b, k, s = len(y), model.latent_dim, max(1, opts.starts)
    y, ctf, rot = y.repeat(s, 1, 1), ctf.repeat(s, 1), rot.repeat(s, 1, 1)
    z0 = torch.zeros(s * b, k)
    if s > 1:
        z0[b:] = torch.randn((s - 1) * b, k, generator=generator) * opts.start_sigma_A
    z = z0.to(y.device).requires_grad_(True)
    groups = [{"params": [z], "lr": opts.lr_A}]
    omega = torch.zeros(s * b, 3, device=y.device, requires_grad=opts.pose_correction)
    shift = torch.zeros(s * b, 2, device=y.device, requires_grad=opts.pose_correction)
    if opts.pose_correction:
        groups += [{"params": [omega], "lr": opts.lr_A / 50}, {"params": [shift], "lr": opts.lr_A}]
    optim = torch.optim.Adam(groups)
    base = [g["lr"] for g in optim.param_groups]

    def residual() -> torch.Tensor:
        A = axis_angle_matrix(omega) @ rot if opts.pose_correction else rot
        pred = model.slices(A, z, kxy) * ctf[..., None]  # the model's scale included
        if opts.pose_correction:
            pred = complex_mul(pred, shift_phase(kxy, shift, model.apix))
        return scaled_residual(pred, y) if opts.image_scale else ((pred - y) ** 2).sum((1, 2))

    for it in range(opts.iterations):
        for g, lr in zip(optim.param_groups, base, strict=True):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / opts.iterations))
        optim.zero_grad(set_to_none=True)
        residual().sum().backward()
        optim.step()
    with torch.no_grad():
        res = (residual() / (y * y).sum((1, 2)).clamp_min(1e-30)).reshape(s, b)
        best = res.argmin(0)
        pick = best * b + torch.arange(b, device=y.device)
        return z.detach()[pick], omega.detach()[pick], shift.detach()[pick], res.min(0).values


def _settings(model: ModeModel, points: Points, opts: DirectOptions, n: int) -> str:
    keep = {k: v for k, v in asdict(opts).items() if k != "chunk_images"}
    return json.dumps({"model": model.describe(), "points": len(points), "options": keep, "n": n},
                      sort_keys=True)


def _load_progress(path: Path, settings: str, n: int, k: int) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            saved = {name: f[name] for name in f.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable direct-fit checkpoint ({exc}); remove it to start again") from None
    if str(saved.get("settings")) != settings:
        raise InputError(path, "the checkpoint was written by a fit with other settings, model or particles; run "
                               "without --resume (and with --overwrite) to start again")
    if saved["amplitudes_A"].shape != (n, k):
        raise InputError(path, f"the checkpoint holds {saved['amplitudes_A'].shape} amplitudes, expected {(n, k)}")
    return saved


def fit_direct(model: ModeModel, reader: ImageReader, prep: ImagePreparer, opts: DirectOptions, out_dir: Path,
               device: torch.device, hooks: Any, resume: bool = False) -> DirectResult:
    """Fit every particle of ``reader`` (prepared by ``prep``, whose points are the pixels fitted), chunk by chunk,
    writing ``out_dir/direct_checkpoint.npz`` after each chunk; ``resume`` skips the chunks it holds."""
    import time

    n, k = len(reader), model.latent_dim
    model.to(device)
    kxy = prep.points.kxy.to(device)
    path = Path(out_dir) / DIRECT_CHECKPOINT
    settings = _settings(model, prep.points, opts, n)
    saved = _load_progress(path, settings, n, k) if resume else None
    if resume and saved is None:
        hooks.log.info("--resume: no direct-fit checkpoint in %s, starting from scratch", out_dir)
    state = saved or {"amplitudes_A": np.zeros((n, k)), "rotation_deg": np.zeros((n, 3)),
                      "shift_A": np.zeros((n, 2)), "residual": np.full(n, np.nan), "done": np.zeros(n, bool)}
    chunks = [np.arange(s, min(s + opts.chunk_images, n)) for s in range(0, n, opts.chunk_images)]
    todo = [c for c in chunks if not state["done"][c].all()]
    if saved is not None:
        hooks.log.info("resuming the direct fit: %d of %d chunks done", len(chunks) - len(todo), len(chunks))

    def transform(batch: Batch) -> Batch:
        return Batch(batch.rows, torch.empty(0), loss_inputs(prep(batch)))

    seconds = 0.0
    for c in hooks.progress(todo, "fitting modes", len(todo)):
        t0 = time.perf_counter()
        batches = [c[s:s + opts.batch_size] for s in range(0, len(c), opts.batch_size)]
        for batch in BatchStream(reader, batches, transform, prefetch=2, chunk_images=len(c)):
            rows = np.asarray(batch.rows)
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([opts.seed, int(rows[0])])
                                                  .generate_state(1)[0]))
            d = {key: v.to(device) for key, v in batch.data.items()}
            z, om, sh, res = fit_batch(model, kxy, d, opts, g)
            state["amplitudes_A"][rows] = z.cpu().double().numpy()
            state["rotation_deg"][rows] = np.rad2deg(om.cpu().double().numpy())
            state["shift_A"][rows] = sh.cpu().double().numpy()
            state["residual"][rows] = res.cpu().double().numpy()
            hooks.check_abort()
        state["done"][c] = True
        seconds += time.perf_counter() - t0
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, settings=np.array(settings), **{name: v for name, v in state.items() if name != "settings"})
    return DirectResult(state["amplitudes_A"], state["rotation_deg"], state["shift_A"], state["residual"], seconds)


@torch.no_grad()
def estimate_scale(model: ModeModel, reader: ImageReader, prep: ImagePreparer, device: torch.device,
                   n_sample: int = 256, seed: int = 0) -> float:
    """Least-squares intensity scale of the reference (amplitudes 0) to a fixed sample of prepared images."""
    kxy = prep.points.kxy.to(device)
    model.to(device)
    num = den = 0.0
    for b in prepared_sample(reader, prep, n_sample, seed, 0x5CA1E):
        y = torch.view_as_real(b.images_ft).to(device)
        pred = model.slices(b.rotations.to(device), None, kxy) / model.log_scale.exp() * b.ctf.to(device)[..., None]
        num += float((pred * y).sum())
        den += float((pred * pred).sum())
    if not num > 0:
        raise InputError(reader.layouts[0].path, "the particle images do not correlate positively with the atomic "
                                                 "model projected at their poses: check the poses, the model's "
                                                 "placement and hand, and the images' contrast (particles white)")
    return num / den
