"""Training the cryoDRGN-style VAE with known poses: ELBO with β, checkpoints, resume, NaN guard, DDP.

Image model (RELION conventions): the centred transform of a particle image, moved back by its origin
(``undo_origin``), is CTF(k) · F_V(z; Aᵀ(kx, ky, 0)) plus noise. The loss per image is the mean over
the pixels of the resolution circle of |prediction − data|² (equal to cryoDRGN's Hartley-domain MSE;
only the half-plane is evaluated, the other half being its complex conjugate) plus
β · KL(q(z|image) ‖ N(0, I)) / (number of pixels in the circle).

Reproducibility: every epoch's particle order and every reparameterisation noise draw are functions
of (seed, epoch, step), and the layers are initialised from the seed, so a run resumed from its
checkpoint retraces an uninterrupted one, and R ranks with a global batch G retrace one rank with G.

Distributed: launched by ``torchrun`` (WORLD_SIZE, RANK, LOCAL_RANK in the environment); each rank
reads its own share of every global batch; gradients are averaged by DistributedDataParallel; rank 0
writes checkpoints and outputs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cryohet.atomic import atomic_path
from cryohet.data.loader import Batch, BatchStream, ImageReader, epoch_order, reader_for, shard_batches
from cryohet.errors import InputError
from cryohet.geometry.ctf import CTFParams, ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.fourier import fft2c
from cryohet.geometry.shift import undo_origin
from cryohet.models.neural import HetVAE, VAEConfig, load_model, read_model_file, save_model

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "cryohet-vae-checkpoint-1"


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite (a ValueError so that the CLI reports it as one line)."""


@dataclass
class TrainOptions:
    """How to train (none of these changes the architecture)."""

    epochs: int = 20
    batch_size: int = 16          # global batch (all ranks together), particles
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta: float = 0.0             # KL weight; 0 = 1 / zdim (cryoDRGN's default)
    amp: str = "auto"             # auto (CUDA; CPUs with native bfloat16), yes, no
    window_radius: float = 0.85   # soft real-space circle, fraction of box/2 (0 = none)
    chunk_images: int = 4096      # images read per block (memory bound: ~ chunk_images * box² * 4 bytes)
    shuffle_window: int = 4       # chunks shuffled together
    prefetch: int = 4             # prepared batches waiting in the queue
    norm_sample: int = 1000       # images used to set the data scale
    encode_batch: int = 256       # particles per batch when computing the final latents
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, owns), device


# ---------------------------------------------------------------------------------------------------
# Data preparation (runs in the loader's thread)


def soft_circle(box: int, radius_frac: float) -> torch.Tensor | None:
    """cryoDRGN's real-space window: 1 inside radius_frac·box/2, cosine fall-off to 0.99·box/2."""
    if radius_frac <= 0:
        return None
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) / (box / 2)
    r_out = max(0.99, radius_frac + 1e-3)
    t = ((r - radius_frac) / (r_out - radius_frac)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class Preparer:
    """Particle images -> the model's inputs: centred half-plane transforms, CTF, encoder input, poses."""

    def __init__(self, cfg: VAEConfig, raw_box: int, euler_deg: np.ndarray, shift_A: np.ndarray, ctf: CTFParams,
                 window_radius: float, stack_paths: list[Path] | None = None):
        from cryohet.models.neural import half_plane_points

        self.cfg = cfg
        self.raw_box = raw_box
        self.window = soft_circle(raw_box, window_radius)
        self.pix, _ = half_plane_points(cfg.box, cfg.max_freq)
        self.euler = np.asarray(euler_deg, dtype=np.float64)
        self.shift_A = np.asarray(shift_A, dtype=np.float64)
        self.ctf = ctf
        self.scale = float(cfg.data_scale)
        self.stack_paths = stack_paths

    def transforms(self, images: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Centred, cropped, origin-corrected transforms at the half-plane points (B, M) complex64."""
        if not torch.isfinite(images).all():
            b = int(torch.nonzero(~torch.isfinite(images.reshape(len(rows), -1)).all(1))[0])
            raise InputError(None, f"particle {int(rows[b])} (row in the particle file, 0-based) holds NaN or "
                                   "infinite pixel values")
        if self.window is not None:
            images = images * self.window
        F = fft2c(images)
        box = self.cfg.box
        if box != self.raw_box:
            lo = self.raw_box // 2 - box // 2
            F = F[..., lo:lo + box, lo:lo + box] * (box / self.raw_box) ** 2
        origin_px = torch.as_tensor(self.shift_A[rows] / self.cfg.apix)
        F = undo_origin(F, origin_px)
        return F.reshape(len(rows), -1)[:, self.pix].to(torch.complex64)

    def __call__(self, batch: Batch) -> Batch:
        rows = batch.rows
        y = self.transforms(batch.images, rows) / self.scale
        c = ctf_2d(self.ctf.take(rows), self.cfg.box, self.cfg.apix).reshape(len(rows), -1)[:, self.pix]
        yr = torch.view_as_real(y).contiguous()                                   # (B, M, 2)
        enc = (yr * torch.sign(c)[..., None]).reshape(len(rows), -1)            # phase-flipped, as cryoDRGN
        rot = torch.as_tensor(euler_to_matrix(self.euler[rows]), dtype=torch.float32)
        batch.data = {"y": yr, "ctf": c.to(torch.float32), "enc": enc, "rot": rot}
        batch.images = torch.empty(0)
        return batch


def data_scale(reader: ImageReader, prep: Preparer, n_sample: int, seed: int) -> float:
    """RMS of the transforms' values in the resolution circle over a fixed sample of particles."""
    n = len(reader)
    rows = np.sort(np.random.default_rng([seed, 0xDA7A]).permutation(n)[:min(n, n_sample)])
    acc, count = 0.0, 0
    for s in range(0, len(rows), 256):
        r = rows[s:s + 256]
        F = prep.transforms(torch.from_numpy(reader.read(r)), r)
        acc += float((F.abs() ** 2).sum())
        count += F.numel()
    rms = math.sqrt(acc / max(count, 1))
    if not rms > 0 or not math.isfinite(rms):
        raise InputError(None, "the particle images are empty (all zero) inside the resolution circle")
    return rms


# ---------------------------------------------------------------------------------------------------
# Loss


class ELBOLoss(nn.Module):
    """The per-batch loss terms; one module so that DistributedDataParallel sees the whole forward."""

    def __init__(self, model: HetVAE):
        super().__init__()
        self.model = model

    def forward(self, enc: torch.Tensor, y: torch.Tensor, ctf: torch.Tensor, rot: torch.Tensor,
                eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encoder(enc)
        mu, logvar = mu.float(), logvar.float()
        z = mu + eps * torch.exp(0.5 * logvar)
        pred = self.model.decode_slices(rot, z).float() * ctf[..., None]
        gen = ((pred - y) ** 2).sum(-1).mean()
        kld = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        return gen, kld


def _noise(seed: int, epoch: int, step: int, n_total: int, zdim: int, lo: int, hi: int) -> torch.Tensor:
    """Reparameterisation noise of particles lo..hi of global batch (epoch, step): the same on every rank."""
    state = np.random.SeedSequence([seed, epoch, step, 0xE95]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0] % (2**63)))
    return torch.randn((n_total, zdim), generator=g)[lo:hi]


def autocast_for(device: torch.device, amp: str) -> tuple[Callable[[], contextlib.AbstractContextManager], bool]:
    """(context factory, needs a gradient scaler) for mixed precision on ``device``."""
    if amp == "no":
        return contextlib.nullcontext, False
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), False
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), True
    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if amp == "yes" or (amp == "auto" and native):
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False
    return contextlib.nullcontext, False


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model: HetVAE, optim: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, float]], opts: TrainOptions, n_particles: int) -> None:
    """Model, optimizer, RNG and epoch in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = optim.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": CHECKPOINT_FORMAT, "config": model.cfg.to_json(), "epoch": str(epoch),
            "history": json.dumps(history), "param_groups": json.dumps(sd["param_groups"]),
            "options": json.dumps(asdict(opts)), "n_particles": str(n_particles)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


@dataclass
class Checkpoint:
    cfg: VAEConfig
    epoch: int
    history: list[dict[str, float]]
    n_particles: int
    tensors: dict[str, torch.Tensor]
    param_groups: list[dict[str, Any]]
    options: str = "{}"

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[6:]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def optim_state(self, optim: torch.optim.Optimizer) -> dict[str, Any]:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in self.tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        groups = self.param_groups
        for g, cur in zip(groups, optim.state_dict()["param_groups"]):
            g["params"] = cur["params"]
        return {"state": state, "param_groups": groups}


def load_checkpoint(path: Path) -> Checkpoint:
    tensors, meta = read_model_file(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, f"not a cryohet VAE checkpoint (format {meta.get('format')!r})")
    return Checkpoint(VAEConfig.from_dict(json.loads(meta["config"])), int(meta["epoch"]),
                      json.loads(meta["history"]), int(meta["n_particles"]), tensors, json.loads(meta["param_groups"]),
                      meta.get("options", "{}"))


def check_compatible(cfg: VAEConfig, other: VAEConfig, source: Path) -> None:
    """Refuse weights of another box, pixel size or architecture."""
    if cfg.box != other.box:
        raise InputError(source, f"the model was trained at a box of {other.box} px but the particles give "
                                 f"{cfg.box} px (after --crop_box); use the same box")
    if abs(cfg.apix - other.apix) > 1e-3 * other.apix:
        raise InputError(source, f"the model was trained at {other.apix:g} Å/pixel but the particles give "
                                 f"{cfg.apix:g} Å/pixel")
    a, b = cfg.architecture(), other.architecture()
    diff = [f"{k}: {b[k]} (model) vs {a[k]} (asked)" for k in a if a[k] != b[k]]
    if diff:
        raise InputError(source, "the model's architecture differs from the one asked for: " + "; ".join(diff))


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    model: HetVAE
    z_mu: np.ndarray | None          # (N, zdim), particle file order (rank 0 only)
    z_logvar: np.ndarray | None
    history: list[dict[str, float]]
    epoch_seconds: list[float]
    start_epoch: int


def _plain(items: Iterable, desc: str, total: int | None = None) -> Iterator:
    yield from items


class _Hooks:
    """What the trainer needs from its host (a RunContext, or defaults for library use)."""

    def __init__(self, ctx: Any | None):
        import logging

        self.log = getattr(ctx, "log", None) or logging.getLogger("cryohet.vae")
        self.progress = getattr(ctx, "progress", None) or _plain
        self.check_abort = getattr(ctx, "check_abort", None) or (lambda: None)


def train_vae(pset: Any, cfg: VAEConfig, opts: TrainOptions, out_dir: str | Path, device: torch.device | str = "cpu",
              ctx: Any | None = None, resume: bool = False, init_model: str | Path | None = None) -> TrainResult:
    """Train on the particles of ``pset`` (a ParticleSet) and return the model and the latents.

    ``cfg.box``/``cfg.apix`` must be the (cropped) box and its pixel size; ``cfg.data_scale`` is set
    here. Writes ``out_dir/checkpoint.safetensors`` after every epoch (rank 0).
    """
    hooks = _Hooks(ctx)
    log = hooks.log
    out_dir = Path(out_dir)
    ddp, device = setup_distributed(torch.device(device))
    try:
        result = _train(pset, cfg, opts, out_dir, device, hooks, ddp, resume, init_model)
        ddp.barrier()  # every rank's collectives are complete before the group is torn down
        return result
    finally:
        ddp.close()
        log.debug("distributed group closed")


def _collective_abort_check(hooks: _Hooks, device: torch.device) -> None:
    """All ranks stop together when any of them sees an abort request."""
    from cryohet.runner import RunAborted

    try:
        hooks.check_abort()
        flag = torch.zeros(1, device=device)
    except RunAborted:
        flag = torch.ones(1, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # nccl needs the tensor on the rank's GPU
    if flag.item() > 0:
        raise RunAborted("abort requested")


def _train(pset: Any, cfg: VAEConfig, opts: TrainOptions, out_dir: Path, device: torch.device, hooks: _Hooks,
           ddp: Dist, resume: bool, init_model: str | Path | None) -> TrainResult:
    log = hooks.log
    reader = reader_for(pset)
    n = len(reader)
    raw_box = reader.box
    if cfg.box > raw_box:
        raise InputError(pset.stack_paths[0], f"--crop_box {cfg.box} is larger than the images ({raw_box} px)")
    if opts.batch_size % ddp.world:
        raise ValueError(f"--batch_size {opts.batch_size} must be a multiple of the number of ranks ({ddp.world})")
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        check_compatible(cfg, ckpt.cfg, ckpt_path)
        if ckpt.n_particles != n:
            raise InputError(ckpt_path, f"the checkpoint was trained on {ckpt.n_particles} particles, "
                                        f"the input has {n}")
        cfg.data_scale, cfg.seed = ckpt.cfg.data_scale, ckpt.cfg.seed
        seed = int(json.loads(ckpt.options).get("seed", opts.seed))
        if seed != opts.seed:  # the epoch orders and noise draws continue as the run began
            log.warning("--seed %d ignored on resuming: the run was started with seed %d", opts.seed, seed)
            opts.seed = seed
        log.info("resuming from %s after epoch %d", ckpt_path, ckpt.epoch)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)

    prep = Preparer(cfg, raw_box, pset.euler_deg, pset.shift_A, pset.ctf, opts.window_radius)
    if ckpt is None:
        cfg.data_scale = data_scale(reader, prep, opts.norm_sample, opts.seed)
        prep.scale = cfg.data_scale
        log.info("data scale (RMS of the transforms in the resolution circle): %.6g", cfg.data_scale)

    model = HetVAE(cfg)
    if init_model is not None and ckpt is None:
        init = load_model(init_model)
        check_compatible(cfg, init.cfg, Path(init_model))
        model.load_state_dict(init.state_dict())
        log.info("initial weights from %s", init_model)
    model.to(device)
    loss_mod: nn.Module = ELBOLoss(model)
    if ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        loss_mod = DistributedDataParallel(loss_mod, device_ids=[device] if device.type == "cuda" else None,
                                           broadcast_buffers=False)  # the buffers are constants
    try:  # the fused kernel is 3x faster than the per-tensor loop on CPU
        optim = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        optim = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    history: list[dict[str, float]] = []
    start_epoch = 1
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state())
        optim.load_state_dict(ckpt.optim_state(optim))
        for g in optim.param_groups:  # the learning rate and weight decay asked for now apply
            g["lr"], g["weight_decay"] = opts.lr, opts.weight_decay
        if "rng.torch" in ckpt.tensors:
            torch.set_rng_state(ckpt.tensors["rng.torch"])
        history, start_epoch = ckpt.history, ckpt.epoch + 1

    amp_ctx, use_scaler = autocast_for(device, opts.amp)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    beta = opts.beta if opts.beta > 0 else 1.0 / max(cfg.zdim, 1)
    kl_weight = beta / (2 * model.n_points)
    log.info("VAE: %d particles, box %d px at %.4g Å/px, %d frequencies in the half-plane, zdim %d, "
             "%d parameters, beta %.4g, global batch %d on %d rank(s), mixed precision %s",
             n, cfg.box, cfg.apix, model.n_points, cfg.zdim, sum(p.numel() for p in model.parameters()),
             beta, opts.batch_size, ddp.world, "on" if amp_ctx is not contextlib.nullcontext else "off")
    file_order = reader.file_order()
    per_rank = opts.batch_size // ddp.world
    epoch_seconds: list[float] = []
    for epoch in range(start_epoch, opts.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        order = epoch_order(n, epoch, opts.seed, True, file_order, opts.chunk_images, opts.shuffle_window)
        n_steps = len(shard_batches(order, opts.batch_size, 0, 1))
        mine = shard_batches(order, opts.batch_size, ddp.rank, ddp.world)
        stream = BatchStream(reader, mine, prep, opts.prefetch, opts.chunk_images)
        # one rank checks for an abort at every batch; several agree on it at the end of the epoch
        items = hooks.progress(stream, f"epoch {epoch}/{opts.epochs}", len(mine)) if ddp.world == 1 else iter(stream)
        sums = torch.zeros(3, dtype=torch.float64)
        model.train()
        for step, batch in enumerate(items):
            d = {k: v.to(device, non_blocking=True) for k, v in batch.data.items()}
            b = len(batch.rows)
            g_total = min(opts.batch_size, len(order) - step * opts.batch_size)
            lo = ddp.rank * per_rank if g_total == opts.batch_size else None
            if lo is None:  # an incomplete last batch, cut as np.array_split does
                sizes = [len(a) for a in np.array_split(np.arange(g_total), ddp.world)]
                lo = int(sum(sizes[:ddp.rank]))
            eps = _noise(opts.seed, epoch, step, g_total, cfg.zdim, lo, lo + b).to(device)
            with amp_ctx():
                gen, kld = loss_mod(d["enc"], d["y"], d["ctf"], d["rot"], eps)
            loss = gen + kl_weight * kld
            optim.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optim)
            else:
                loss.backward()
            gsum = torch.stack([p.grad.float().sum() for p in model.parameters() if p.grad is not None]).sum()
            vals = torch.stack([loss.detach().float(), gen.detach().float(), kld.detach().float(), gsum]).cpu()
            loss_v, grad_ok = float(vals[0]), math.isfinite(float(vals[3]))
            if (math.isnan(loss_v) if scaler is not None else not (math.isfinite(loss_v) and grad_ok)):
                raise TrainingDiverged(
                    f"the loss became {loss_v} (gradients finite: {grad_ok}) at epoch {epoch}, batch "
                    f"{step + 1}/{n_steps}; training stopped. The last good checkpoint "
                    f"({'epoch ' + str(epoch - 1) if epoch > 1 else 'none yet'}) is kept in "
                    f"{out_dir / CHECKPOINT_NAME}. "
                    "Lower --lr, or check the particles' poses and CTF, then continue with --resume yes.")
            if scaler is not None:
                scaler.step(optim)
                scaler.update()
            else:
                optim.step()
            sums += torch.tensor([float(vals[1]) * b, float(vals[2]) * b, b], dtype=torch.float64)
        if ddp.world > 1:
            sums_dev = sums.to(device)
            dist.all_reduce(sums_dev)
            sums = sums_dev.cpu()
            _collective_abort_check(hooks, device)
        else:
            hooks.check_abort()
        secs = time.perf_counter() - t0
        epoch_seconds.append(secs)
        cnt = max(float(sums[2]), 1.0)
        rec = {"epoch": epoch, "gen_loss": float(sums[0]) / cnt, "kld": float(sums[1]) / cnt,
               "loss": (float(sums[0]) + kl_weight * float(sums[1])) / cnt, "seconds": secs,
               "cpu_seconds": time.process_time() - c0}
        history.append(rec)
        log.info("epoch %d/%d: reconstruction %.6f, KL %.4f, loss %.6f (%.1f s, %.1f CPU s)", epoch, opts.epochs,
                 rec["gen_loss"], rec["kld"], rec["loss"], secs, rec["cpu_seconds"])
        if ddp.main:
            save_checkpoint(out_dir / CHECKPOINT_NAME, model, optim, epoch, history, opts, n)
        ddp.barrier()

    z_mu, z_logvar = encode_particles(model, reader, prep, opts, device, ddp, amp_ctx)
    return TrainResult(model, z_mu, z_logvar, history, epoch_seconds, start_epoch)


@torch.no_grad()
def encode_particles(model: HetVAE, reader: ImageReader, prep: Preparer, opts: TrainOptions, device: torch.device,
                     ddp: Dist | None = None, amp_ctx: Callable[[], contextlib.AbstractContextManager] | None = None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Latent means and log-variances of every particle, in particle-file order (rank 0 gets them)."""
    ddp = ddp or Dist()
    amp_ctx = amp_ctx or contextlib.nullcontext
    if reader.box < model.cfg.box:
        raise InputError(reader.layouts[0].path, f"the images are {reader.box} px, smaller than the model's box "
                                                 f"of {model.cfg.box} px")
    n = len(reader)
    bounds = np.linspace(0, n, ddp.world + 1).astype(np.int64)
    mine = np.arange(bounds[ddp.rank], bounds[ddp.rank + 1])
    batches = [mine[s:s + opts.encode_batch] for s in range(0, len(mine), opts.encode_batch)]
    was = model.training
    model.eval()
    outs = []
    for batch in BatchStream(reader, batches, prep, opts.prefetch, opts.chunk_images):
        with amp_ctx():
            mu, logvar = model.encoder(batch.data["enc"].to(device))
        outs.append(torch.cat([mu.float(), logvar.float()], 1).cpu())
    model.train(was)
    local = torch.cat(outs) if outs else torch.zeros((0, 2 * model.cfg.zdim))
    if ddp.world > 1:
        size = int(max(bounds[1:] - bounds[:-1]))
        pad = torch.zeros((size, local.shape[1]))
        pad[:len(local)] = local
        comm = pad.to(device)
        parts = [torch.zeros_like(comm) for _ in range(ddp.world)]
        dist.all_gather(parts, comm)
        local = torch.cat([p.cpu()[:int(bounds[r + 1] - bounds[r])] for r, p in enumerate(parts)])
        if not ddp.main:
            return None, None
    arr = local.numpy()
    return arr[:, :model.cfg.zdim].astype(np.float32), arr[:, model.cfg.zdim:].astype(np.float32)


def model_box_for(raw_box: int, crop_box: int) -> int:
    """The model's box: ``crop_box`` when set (even, not larger than the images), else the images' box."""
    if crop_box <= 0:
        return raw_box
    if crop_box % 2 or crop_box > raw_box:
        raise ValueError(f"--crop_box must be even and at most the image box ({raw_box} px), got {crop_box}")
    return crop_box


def save_final_model(path: Path, model: HetVAE, history: list[dict[str, float]]) -> Path:
    return save_model(path, model, {"history": json.dumps(history)})
