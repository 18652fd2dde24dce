"""The one training loop for every gradient-trained pair of a volume model and an inference strategy.

An *objective* is an ``nn.Module`` holding a volume model and an inference strategy (``amortised.py``,
``autodecoder.py``, ...). It offers ``inputs(ImageBatch) -> dict`` (run in the loader thread),
``forward(inputs, eps) -> (reconstruction error, regulariser)``, ``kl_weight``, ``noise_dim`` (latent noise
drawn per particle, 0 for none), ``param_groups(lr)``, ``settings`` and
``latents(batches, device) -> (rows, mu, logvar)``; optionally ``epoch_terms() -> dict[str, float]``: the means of
its own loss terms over the images since the last call, added to each epoch's history (averaged over ranks), and
``start_epoch(epoch, epochs)``, called before each epoch (a schedule of its own, such as frequency marching);
``initialise(n, stream, reduce, seed, log)``, called once before a new run's first epoch (not on resuming), with
passes over the prepared data (``stream(rows)``: each batch's data and its ``rows``) and a sum over the ranks
(``reduce``); optionally ``poses``: per-particle pose corrections (``pose_tables.PoseCorrections``, or None),
which the trainer steps after each optimiser step and makes agree over the ranks after each epoch.

The trainer owns what they share: chunk-shuffled streaming epochs, mixed precision, the NaN guard, abort
requests, a checkpoint after every epoch and resuming from it, and DistributedDataParallel under torchrun.

Reproducibility: every epoch's particle order and every noise draw are functions of (seed, epoch, step), so a run
resumed from its checkpoint retraces an uninterrupted one, and R ranks with a global batch G retrace one rank with G.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cryohet.data.device_feed import device_feed, pin
from cryohet.data.image_cache import CachedPreparer, PreparedCache, open_cache
from cryohet.data.loader import Batch, BatchStream, epoch_order, shard_batches
from cryohet.data.prepare import ImagePreparer
from cryohet.distributed import Dist
from cryohet.errors import InputError, RunAborted
from cryohet.io.reader import ImageReader
from cryohet.io.weights import read_checkpoint, read_weights, write_weights

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMATS = ("cryohet-train-checkpoint-1", "cryohet-vae-checkpoint-1")  # written, and read too


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite (a ValueError so that the CLI reports it as one line)."""


@dataclass
class TrainOptions:
    """How to train (none of these changes the model)."""

    epochs: int = 20
    batch_size: int = 16          # global batch (all ranks together), particles
    lr: float = 1e-4
    weight_decay: float = 0.0
    amp: str = "auto"             # auto (CUDA; CPUs with native bfloat16), yes, no
    chunk_images: int = 4096      # images read per block (memory bound: ~ chunk_images * box² * 4 bytes)
    shuffle_window: int = 4       # chunks shuffled together
    prefetch: int = 4             # prepared batches waiting in the queue (0: prepared in the training thread)
    cache: str = "off"            # prepared-image cache: auto, memory, disk, off (data.image_cache)
    cache_dir: str = ""           # folder of a disk cache (empty: the run folder)
    encode_batch: int = 256       # particles per batch when computing the final latents
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> TrainOptions:
        """The options a method's parameters name (same names, e.g. ``epochs``, ``cache``), then ``overrides``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})


@dataclass
class Hooks:
    """What the trainer needs from its host (a RunContext, or defaults for library use)."""

    log: logging.Logger = field(default_factory=lambda: logging.getLogger("cryohet.train"))
    progress: Callable[[Iterable, str, int], Iterator] = lambda items, desc, total=None: iter(items)
    check_abort: Callable[[], None] = lambda: None
    #: called on the main rank after each epoch (its checkpoint written) with the epoch and the history so far
    on_epoch_end: Callable[[int, list[dict[str, float]]], None] = lambda epoch, history: None

    @staticmethod
    def of(ctx: Any | None) -> Hooks:
        h = Hooks()
        for name in ("log", "progress", "check_abort"):
            if getattr(ctx, name, None) is not None:
                setattr(h, name, getattr(ctx, name))
        return h


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


@dataclass
class Checkpoint:
    meta: dict[str, str]                 # the caller's metadata (configuration, settings)
    epoch: int
    history: list[dict[str, float]]
    n_particles: int
    tensors: dict[str, torch.Tensor]
    param_groups: list[dict[str, Any]]
    options: dict[str, Any]

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[6:]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def optim_state(self, optim: torch.optim.Optimizer) -> dict[str, Any]:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in self.tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        groups = self.param_groups
        for g, cur in zip(groups, optim.state_dict()["param_groups"], strict=True):
            g["params"] = cur["params"]
        return {"state": state, "param_groups": groups}


def save_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, float]], opts: TrainOptions, n_particles: int,
                    meta: dict[str, str]) -> None:
    """Model, optimizer, RNG, epoch and the caller's metadata in one safetensors file, written atomically; the
    checkpoint it replaces is kept as ``checkpoint.prev.safetensors`` (``read_checkpoint`` falls back to it)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd = optim.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    write_weights(path, tensors, {**meta, "format": CHECKPOINT_FORMATS[0], "epoch": str(epoch),
                                  "history": json.dumps(history), "param_groups": json.dumps(sd["param_groups"]),
                                  "options": json.dumps(asdict(opts)), "n_particles": str(n_particles)},
                  checkpoint=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``; InputError when it is missing, truncated, corrupt or not a training checkpoint."""
    tensors, meta = read_weights(path)
    if meta.get("format") not in CHECKPOINT_FORMATS:
        raise InputError(path, f"not a cryohet training checkpoint (format {meta.get('format')!r})")
    try:
        ckpt = Checkpoint(meta, int(meta["epoch"]), json.loads(meta["history"]), int(meta["n_particles"]), tensors,
                          json.loads(meta["param_groups"]), json.loads(meta.get("options", "{}")))
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None
    if len(ckpt.history) != ckpt.epoch or not ckpt.model_state():
        raise InputError(path, f"inconsistent checkpoint: epoch {ckpt.epoch} with {len(ckpt.history)} epochs of "
                               f"history and {len(ckpt.model_state())} model tensors")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    epoch_seconds: list[float]
    start_epoch: int
    z_mu: np.ndarray | None
    z_logvar: np.ndarray | None


def resume_point(out_dir: Path, meta: dict[str, str], n: int, hooks: Hooks, owner: bool = True,
                 check: Callable[[Path, Checkpoint], None] | None = None) -> Checkpoint | None:
    """The checkpoint in ``out_dir`` to continue from (None, logged, when there is none): the newest usable one
    (``read_checkpoint``; ``owner``: the rank that writes them), checked against what is asked now. InputError
    naming the file when its ``meta`` strings differ from ``meta``, when ``check(path, ckpt)`` (the caller's own
    checks) raises one, or when it was trained on other than ``n`` particles."""
    found = read_checkpoint(Path(out_dir) / CHECKPOINT_NAME, load_checkpoint, hooks.log, owner)
    if found is None:
        hooks.log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
        return None
    path, ckpt = found
    diff = [k for k in meta if ckpt.meta.get(k) != meta[k]]
    if diff:
        raise InputError(path, f"the checkpoint was trained with other settings ({', '.join(diff)}); run without "
                               "--resume (and with --overwrite) to start again")
    if check is not None:
        check(path, ckpt)
    if ckpt.n_particles != n:
        raise InputError(path, f"the checkpoint was trained on {ckpt.n_particles} particles, the input has {n}")
    hooks.log.info("resuming from %s after epoch %d", path, ckpt.epoch)
    return ckpt


def _noise(seed: int, epoch: int, step: int, n_total: int, dim: int, lo: int, hi: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Latent noise of particles lo..hi of global batch (epoch, step): the same on every rank of one device type.
    Drawn by a generator on ``device`` itself, so that a GPU step copies nothing from the host and waits for
    nothing (the stream differs from the CPU's, as the CPU's and the GPU's arithmetic do)."""
    state = np.random.SeedSequence([seed, epoch, step, 0xE95]).generate_state(2, dtype=np.uint64)
    g = torch.Generator(device=device).manual_seed(int(state[0] % (2**63)))
    return torch.randn((n_total, dim), generator=g, device=device)[lo:hi]


def _collective_abort_check(hooks: Hooks, device: torch.device) -> None:
    """All ranks stop together when any of them sees an abort request."""
    try:
        hooks.check_abort()
        flag = torch.zeros(1, device=device)
    except RunAborted:
        flag = torch.ones(1, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # nccl needs the tensor on the rank's GPU
    if flag.item() > 0:
        raise RunAborted("abort requested")


def _gather_rows(ddp: Dist, device: torch.device, rows: np.ndarray, values: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's (rows, values) on rank 0, sorted by row (other ranks get None)."""
    if ddp.world == 1:
        order = np.argsort(rows, kind="stable")
        return rows[order], values[order]
    local = torch.as_tensor(np.concatenate([rows[:, None].astype(np.float64), values.astype(np.float64)], 1))
    size = torch.tensor([len(local)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(ddp.world)]
    dist.all_gather(sizes, size)
    top = int(max(int(s) for s in sizes))
    pad = torch.zeros((top, local.shape[1]), dtype=torch.float64)
    pad[:len(local)] = local
    comm = pad.to(device)
    parts = [torch.zeros_like(comm) for _ in range(ddp.world)]
    dist.all_gather(parts, comm)
    if not ddp.main:
        return None, None
    allv = torch.cat([p.cpu()[:int(s)] for p, s in zip(parts, sizes, strict=True)]).numpy()
    allv = allv[np.argsort(allv[:, 0], kind="stable")]
    return allv[:, 0].astype(np.int64), allv[:, 1:]


#: steps between two reads of the step guard (each read waits for the device's queued work)
CHECK_EVERY = 16


class _StepGuard:
    """An epoch's per-step loss terms and gradient sums, written into a window on the device and read by the host
    (one synchronisation) only in :meth:`check`: every ``CHECK_EVERY`` steps and before the epoch's checkpoint.

    ``check`` raises TrainingDiverged at the first step whose loss or gradients are not finite (``nan_only``: whose
    loss is NaN, as under a float16 gradient scaler, which skips steps of infinite gradients itself) and adds the
    good steps' terms, times their images, to ``sums`` (Σ gen·b, Σ reg·b, Σ b; float64 on the host)."""

    def __init__(self, device: torch.device, nan_only: bool):
        self.window = torch.zeros((CHECK_EVERY, 4), dtype=torch.float32, device=device)
        self.sizes: list[int] = []  # images of the steps in the window
        self.sums = [0.0, 0.0, 0.0]
        self.nan_only, self.done, self.fused = nan_only, 0, device.type == "cuda"

    def record(self, loss: torch.Tensor, gen: torch.Tensor, reg: torch.Tensor, b: int,
               grads: list[torch.Tensor]) -> None:
        """A step of ``b`` images: its loss terms and its parameters' gradients (device work only)."""
        if not grads:
            gsum = torch.zeros((), device=self.window.device)
        elif self.fused:  # one multi-tensor kernel on a GPU; on a CPU the plain sums are faster
            gsum = torch.stack(torch._foreach_norm(grads, 1)).sum()
        else:
            gsum = torch.stack([g.float().sum() for g in grads]).sum()
        self.window[len(self.sizes)] = torch.stack([loss.detach().float(), gen.detach().float(),
                                                    reg.detach().float(), gsum.float()])
        self.sizes.append(b)

    def check(self, epoch: int, n_steps: int, ckpt_path: Path) -> None:
        """Read the window; TrainingDiverged naming the first bad step, else its steps added to ``sums``."""
        rows = self.window[:len(self.sizes)].tolist() if self.sizes else []
        for i, ((loss_v, gen_v, reg_v, gsum), b) in enumerate(zip(rows, self.sizes, strict=True)):
            grad_ok = math.isfinite(gsum)
            if math.isnan(loss_v) if self.nan_only else not (math.isfinite(loss_v) and grad_ok):
                raise TrainingDiverged(
                    f"the loss became {loss_v} (gradients finite: {grad_ok}) at epoch {epoch}, batch "
                    f"{self.done + i + 1}/{n_steps}; training stopped. The last good checkpoint "
                    f"({'epoch ' + str(epoch - 1) if epoch > 1 else 'none yet'}) is kept in {ckpt_path}. "
                    "Lower --lr, or check the particles' poses and CTF, then continue with --resume yes.")
            self.sums = [self.sums[0] + gen_v * b, self.sums[1] + reg_v * b, self.sums[2] + b]
        self.done += len(self.sizes)
        self.sizes = []


class Trainer:
    """Fits ``objective`` to the particles read by ``reader`` and prepared by ``prep``.

    ``meta``: strings stored in every checkpoint (the model's configuration), read back by the caller on resume.
    ``host_bytes``: host memory the run will still allocate (its memory plan), kept from the prepared-image cache.
    """

    def __init__(self, objective: nn.Module, reader: ImageReader, prep: ImagePreparer, opts: TrainOptions,
                 out_dir: Path, device: torch.device, ddp: Dist, hooks: Hooks, meta: dict[str, str],
                 host_bytes: int = 0):
        self.objective, self.reader, self.prep, self.opts = objective, reader, prep, opts
        self.host_bytes = host_bytes
        self.out_dir, self.device, self.ddp, self.hooks, self.meta = Path(out_dir), device, ddp, hooks, meta
        if opts.batch_size % ddp.world:
            raise ValueError(f"--batch_size {opts.batch_size} must be a multiple of the number of ranks ({ddp.world})")
        self.cache: PreparedCache | None = None  # open during fit()

    def _transform(self, batch: Batch) -> Batch:
        prep = self.prep if self.cache is None else CachedPreparer(self.prep, self.cache)
        return Batch(batch.rows, torch.empty(0), pin(self.objective.inputs(prep(batch)), self.device))

    def _stream(self, batches: list[np.ndarray]) -> BatchStream:
        return BatchStream(self.reader, batches, self._transform, self.opts.prefetch, self.opts.chunk_images,
                           None if self.cache is None else self.cache.missing)

    def _rank_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """This rank's contiguous share of ``rows``, in batches of ``encode_batch`` (passes without gradients)."""
        mine = np.array_split(np.asarray(rows), self.ddp.world)[self.ddp.rank]
        step = self.opts.encode_batch
        return [mine[s:s + step] for s in range(0, len(mine), step)]

    def _initialise(self) -> None:
        """The objective's ``initialise`` (a new run only), each of its passes with a progress bar on one rank."""
        passes = 0

        def stream(rows: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
            nonlocal passes
            passes += 1
            batches = self._rank_batches(rows)
            loaded = iter(self._stream(batches))
            items = (self.hooks.progress(loaded, f"initialisation, pass {passes}", len(batches))
                     if self.ddp.world == 1 else loaded)
            with contextlib.closing(loaded):  # the loader's thread ends even when the pass is cut short
                for batch in items:
                    yield {**{k: v.to(self.device) for k, v in batch.data.items()},
                           "rows": torch.as_tensor(batch.rows, device=self.device)}

        self.objective.initialise(len(self.reader), stream, self._sum_over_ranks, self.opts.seed, self.hooks.log)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.ddp.world > 1:
            dist.all_reduce(t)
        return t

    def fit(self, ckpt: Checkpoint | None = None) -> TrainResult:
        """Train for ``opts.epochs`` epochs (from ``ckpt`` when given), then infer every particle's latents.

        With ``opts.cache`` the prepared transforms are cached (``data.image_cache``) while this runs; a cache
        file in the run folder is removed when it ends well."""
        self.cache = open_cache(self.opts.cache, self.reader, self.prep, self.out_dir,
                                Path(self.opts.cache_dir) if self.opts.cache_dir else None, self.hooks.log,
                                self.ddp.world, self.host_bytes)
        ok = False
        try:
            result = self._fit(ckpt)
            ok = True
            return result
        finally:
            if self.cache is not None:
                self.cache.close(remove=ok and not self.opts.cache_dir)
            self.cache = None

    def _fit(self, ckpt: Checkpoint | None) -> TrainResult:
        obj, opts, ddp, device, log = self.objective, self.opts, self.ddp, self.device, self.hooks.log
        n = len(self.reader)
        ckpt_path = self.out_dir / CHECKPOINT_NAME
        obj.to(device)
        if ckpt is None and hasattr(obj, "initialise"):
            self._initialise()
        loss_mod: nn.Module = obj
        if ddp.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            loss_mod = DistributedDataParallel(obj, device_ids=[device] if device.type == "cuda" else None,
                                               broadcast_buffers=False)  # the buffers are constants
        groups = obj.param_groups(opts.lr)
        try:  # the fused kernel is 3x faster than the per-tensor loop on CPU
            optim = torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            optim = torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)
        history: list[dict[str, float]] = []
        start_epoch = 1
        if ckpt is not None:
            obj.load_state_dict(ckpt.model_state())
            optim.load_state_dict(ckpt.optim_state(optim))
            for g, fresh in zip(optim.param_groups, obj.param_groups(opts.lr), strict=True):
                g["lr"] = fresh["lr"]  # the learning rates and weight decay asked for now apply
                g["weight_decay"] = fresh.get("weight_decay", opts.weight_decay)
            if "rng.torch" in ckpt.tensors:
                torch.set_rng_state(ckpt.tensors["rng.torch"])
            history, start_epoch = ckpt.history, ckpt.epoch + 1
        amp_ctx, use_scaler = autocast_for(device, opts.amp)
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        log.info("%s inference: %d particles, %d parameters, global batch %d on %d rank(s), mixed precision %s",
                 obj.kind, n, sum(p.numel() for p in obj.parameters()), opts.batch_size, ddp.world,
                 "on" if amp_ctx is not contextlib.nullcontext else "off")
        file_order = self.reader.file_order()
        per_rank = opts.batch_size // ddp.world
        epoch_seconds: list[float] = []
        poses = getattr(obj, "poses", None)
        for epoch in range(start_epoch, opts.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            if poses is not None:
                poses.begin_epoch(epoch, ddp.world > 1)
            if hasattr(obj, "start_epoch"):  # an objective's schedule (e.g. frequency marching)
                obj.start_epoch(epoch, opts.epochs)
            order = epoch_order(n, epoch, opts.seed, True, file_order, opts.chunk_images, opts.shuffle_window)
            n_steps = len(shard_batches(order, opts.batch_size, 0, 1))
            mine = shard_batches(order, opts.batch_size, ddp.rank, ddp.world)
            loaded = iter(self._stream(mine))  # closed below: its thread ends even when a step raises
            # one rank checks for an abort at every batch; several agree on it at the end of the epoch
            items = (self.hooks.progress(loaded, f"epoch {epoch}/{opts.epochs}", len(mine)) if ddp.world == 1
                     else loaded)
            guard = _StepGuard(device, nan_only=scaler is not None)
            obj.train()
            with contextlib.closing(loaded):
                for step, (batch, d) in enumerate(device_feed(items, device)):
                    b = len(batch.rows)
                    g_total = min(opts.batch_size, len(order) - step * opts.batch_size)
                    lo = ddp.rank * per_rank
                    if g_total != opts.batch_size:  # an incomplete last batch, cut as np.array_split does
                        lo = int(sum(len(a) for a in np.array_split(np.arange(g_total), ddp.world)[:ddp.rank]))
                    eps = _noise(opts.seed, epoch, step, g_total, obj.noise_dim, lo, lo + b, device)
                    with amp_ctx():
                        gen, reg = loss_mod(d, eps)
                    loss = gen + obj.kl_weight * reg
                    optim.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optim)
                    else:
                        loss.backward()
                    guard.record(loss, gen, reg, b, [p.grad for p in obj.parameters() if p.grad is not None])
                    if len(guard.sizes) == CHECK_EVERY:
                        guard.check(epoch, n_steps, ckpt_path)
                    if poses is not None:
                        poses.step(scaler._get_scale_async() if scaler is not None else 1.0)  # a tensor: no sync
                    if scaler is not None:
                        scaler.step(optim)
                        scaler.update()
                    else:
                        optim.step()
            guard.check(epoch, n_steps, ckpt_path)  # before the epoch's checkpoint: a bad step is never saved
            sums = torch.tensor(guard.sums, dtype=torch.float64)
            if poses is not None:
                poses.end_epoch(dist.all_reduce if ddp.world > 1 else None)
            if ddp.world > 1:
                sums_dev = sums.to(device)
                dist.all_reduce(sums_dev)
                sums = sums_dev.cpu()
                _collective_abort_check(self.hooks, device)
            else:
                self.hooks.check_abort()
            secs = time.perf_counter() - t0
            epoch_seconds.append(secs)
            cnt = max(float(sums[2]), 1.0)
            rec = {"epoch": epoch, "gen_loss": float(sums[0]) / cnt, "kld": float(sums[1]) / cnt,
                   "loss": (float(sums[0]) + obj.kl_weight * float(sums[1])) / cnt, "seconds": secs,
                   "cpu_seconds": time.process_time() - c0, **self._objective_terms()}
            history.append(rec)
            log.info("epoch %d/%d: reconstruction %.6f, KL %.4f, loss %.6f (%.1f s, %.1f CPU s)", epoch,
                     opts.epochs, rec["gen_loss"], rec["kld"], rec["loss"], secs, rec["cpu_seconds"])
            if ddp.main:
                save_checkpoint(ckpt_path, obj, optim, epoch, history, opts, n, self.meta)
                self.hooks.on_epoch_end(epoch, history)
            ddp.barrier()
        z_mu, z_logvar = self.latents()
        return TrainResult(history, epoch_seconds, start_epoch, z_mu, z_logvar)

    def _objective_terms(self) -> dict[str, float]:
        """The objective's own terms of the epoch (``epoch_terms``), averaged over the ranks; {} without them."""
        terms = getattr(self.objective, "epoch_terms", None)
        if terms is None:
            return {}
        t = terms()
        if self.ddp.world > 1:
            vals = torch.tensor(list(t.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(vals)
            t = dict(zip(t, (vals / self.ddp.world).tolist(), strict=True))
        return t

    def latents(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Every particle's latent mean and log-variance, rows in particle-file order (rank 0)."""
        amp_ctx, _ = autocast_for(self.device, self.opts.amp)
        with amp_ctx():
            rows, mu, logvar = self.objective.latents(
                self._stream(self._rank_batches(np.arange(len(self.reader)))), self.device)
        d = mu.shape[1]
        _, both = _gather_rows(self.ddp, self.device, rows, np.concatenate([mu, logvar], 1))
        if both is None:
            return None, None
        return both[:, :d].astype(np.float32), both[:, d:].astype(np.float32)
