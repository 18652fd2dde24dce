"""CryoGAN / Multi-CryoGAN (Gupta et al. 2020, 2021; survey section 8): the volume (or a distribution of volumes) that
makes simulated images whose distribution a critic cannot tell from the particles', by Wasserstein GAN with gradient
penalty; no pose or latent is inferred per particle.

Forward operator, on the working lattice (the images Fourier-cropped to ``resolution_A``, ``data.prepare``): for
each batch of real particles (streamed by the loader, origins undone), fake images are the Fourier slices of V(z)
(``models.gan.VolumeGenerator``) at uniformly random rotations, or the particles' own rotations with known poses,
times the batch's own CTFs (a random draw of the data's), moved by random shifts within ±``shift_range_A``, plus
white noise of the variance of the images' corners (``moments.corner_noise_variance``). Real and fake images are
low-passed alike by a Gaussian whose radius rises from ``lowpass_start_A`` to past Nyquist over the first
``lowpass_until`` of the steps (CryoGAN's stabilising trick), taken to real space and divided by the noise s.d.
Each generator step follows ``n_critic`` critic steps (Adam, β = (0.5, 0.9)); the maps written are an exponential
moving average of the generator's (decay ``EMA``, divided by its weight), as GANs oscillate about their
equilibrium.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryohet.data.loader import BatchStream, epoch_order, shard_batches
from cryohet.data.prepare import ImageBatch, ImagePreparer, prepared_sample
from cryohet.device import refuse_unless_fits
from cryohet.errors import InputError
from cryohet.geometry.fourier import fft2c, ifft2c, radius_grid
from cryohet.geometry.lattice import Lattice, box_for_resolution
from cryohet.geometry.shift import apply_origin
from cryohet.inference.em_state import load_checkpoint
from cryohet.inference.moments import corner_noise_variance
from cryohet.io.weights import read_weights, write_weights
from cryohet.models.gan import ImageCritic, VolumeGenerator

FORMAT = "cryohet-cryogan-checkpoint-1"
#: Largest working box (the generator's n³ voxels are projected at every step).
MAX_WORK_BOX = 128
#: Smallest working box (the critic halves it three times).
MIN_WORK_BOX = 16
#: Fewest particles accepted.
MIN_PARTICLES = 50
#: Fraction of the device's free memory a run may plan to use.
MEMORY_FRACTION = 0.8
#: Decay of the moving average of the generator's maps per generator step.
EMA = 0.99
#: Critic channels of its first layer.
CRITIC_WIDTH = 16
#: Particles sampled for the data's signal power (the generator's scale).
SCALE_SAMPLE = 500


@dataclass(frozen=True)
class GanSettings:
    poses_known: bool = False
    zdim: int = 0
    resolution_A: float = 0.0          # working lattice's limit (0: the particles' Nyquist)
    diameter_A: float = 0.0            # generator's sphere (0: 0.9 of the box)
    steps: int = 2000                  # generator steps
    n_critic: int = 5
    batch_size: int = 64
    lr_generator: float = 0.3          # Adam, in units of the generator's scale
    lr_critic: float = 1e-3
    gp_weight: float = 10.0
    lowpass_start_A: float = 0.0       # 0: four times the working Nyquist
    lowpass_until: float = 0.5         # fraction of the steps
    shift_range_A: float = 0.0
    checkpoint_every: int = 200


@dataclass
class GanFit:
    maps: np.ndarray                   # (1 + zdim, n, n, n) moving-average X_0, W_1..W_zdim on the working box
    lattice: Lattice
    noise_var: float                   # σ² of the working-box transforms (corners)
    scale: float                       # the generator's voxel scale (map units)
    history: list[dict[str, float]] = field(default_factory=list)
    map_change: float = math.nan       # relative change of X_0 over the last tenth of the steps


def plan(n_particles: int, box: int, apix: float, s: GanSettings, device: torch.device, source: Any) -> Lattice:
    """The working lattice; InputError naming the particles when they are too few, the working box is too large
    or small, or the batches and maps do not fit in memory."""
    if n_particles < MIN_PARTICLES:
        raise InputError(source, f"only {n_particles} particles: CryoGAN needs at least {MIN_PARTICLES}")
    if 0 < s.resolution_A < 2 * apix * (1 - 1e-6):
        raise InputError(source, f"--resolution_A {s.resolution_A:g} Å is beyond the images' Nyquist "
                                 f"({2 * apix:g} Å at {apix:g} Å/px)")
    n = box_for_resolution(box, apix, s.resolution_A)
    n = min(box - box % 8, 8 * math.ceil(n / 8))                  # the critic halves the box three times
    if n < MIN_WORK_BOX:
        raise InputError(source, f"the working box would be {n} px (images of {box} px): CryoGAN needs at least "
                                 f"{MIN_WORK_BOX}")
    if n > MAX_WORK_BOX:
        raise InputError(source, f"the working box would be {n} px: CryoGAN is limited to {MAX_WORK_BOX} px (the "
                                 "generator's voxels are projected at every step): use a larger --resolution_A")
    B, w = s.batch_size, CRITIC_WIDTH
    images = 4 * 2 * B * n * n * (48 + 9 * w * (1 / 4 + 2 / 16 + 4 / 64))   # real + fake, FFT buffers, critic + GP
    maps = 8 * 8 * (1 + s.zdim) * (2 * n) ** 3                             # padded transforms and their gradients
    refuse_unless_fits(images + maps, device, MEMORY_FRACTION, source,
                       f"CryoGAN on a {n}³ working box with {1 + s.zdim} maps and batches of {B}",
                       lambda usable: f"batches of about {max(0, int((usable - maps) / (images / B)))}",
                       "use a smaller --batch_size, a larger --resolution_A or a smaller --zdim")
    return Lattice(box, apix).cropped(n)


def real_batches(particles: Any, prep: ImagePreparer, batch_size: int, seed: int, epoch: int
                 ) -> Iterator[tuple[int, ImageBatch]]:
    """(epoch, prepared batch) of shuffled particles, epoch after epoch from ``epoch``, streamed by the loader."""
    reader = particles.reader()
    n = len(reader)
    while True:
        for batch in BatchStream(reader, shard_batches(epoch_order(n, epoch, seed), batch_size), prep):
            yield epoch, batch
        epoch += 1


def signal_scale(particles: Any, prep: ImagePreparer, noise_var: float, diameter_px: float, seed: int) -> float:
    """A voxel value (map units) of the data's size: a uniform ball of ``diameter_px`` whose projections carry the
    images' mean signal power (their power inside Nyquist less the noise's, at least 1 % of the noise's)."""
    n = prep.lattice.box
    inside = radius_grid(n, 2) <= n / 2
    power, count = 0.0, 0
    for b in prepared_sample(particles.reader(), prep, SCALE_SAMPLE, seed, 0x6A7):
        power += float((b.images_ft.abs() ** 2)[:, inside.to(b.images_ft.device)].sum())
        count += len(b.rows) * int(inside.sum())
    signal = max(power / count - noise_var, 0.01 * noise_var)
    # a ball of value v and diameter L: Σ|image|² ≈ v² L² · π L² / 4 = mean |F|² over the n² pixels (Parseval)
    return math.sqrt(signal / (math.pi / 4)) / diameter_px ** 2


def random_rotations(n: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(Rotation.random(n, random_state=rng).as_matrix(), dtype=torch.float32, device=device)


def lowpass_radius_px(step: int, s: GanSettings, n: int, apix_n: float) -> float | None:
    """Radius (px) of the Gaussian low-pass at ``step``, rising linearly from ``lowpass_start_A`` to twice
    Nyquist over the first ``lowpass_until`` of the steps; None after (no low-pass)."""
    end = s.lowpass_until * s.steps
    if step >= end:
        return None
    r0 = n * apix_n / s.lowpass_start_A if s.lowpass_start_A > 0 else n / 8
    return r0 + (n - r0) * step / end


class GanTrainer:
    """The generator, the critic, their optimisers and the moving average; one generator step at a time."""

    def __init__(self, s: GanSettings, lattice: Lattice, noise_var: float, scale: float, radius_px: float,
                 device: torch.device, seed: int):
        torch.manual_seed(seed)
        n = lattice.box
        self.s, self.n, self.apix_n, self.device, self.seed = s, n, lattice.apix, device, seed
        self.G = VolumeGenerator(n, s.zdim, radius_px, scale).to(device)
        self.D = ImageCritic(n, CRITIC_WIDTH).to(device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=s.lr_generator, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=s.lr_critic, betas=(0.5, 0.9))
        self.noise_sd = math.sqrt(noise_var) / n                 # real-space s.d. of the working-box noise
        self.k2 = (radius_grid(n, 2, device) ** 2)
        self.inside = (self.k2 <= (n / 2) ** 2).to(torch.float32)
        self.ema = self.G.maps().detach().clone()
        self.step = 0
        self.snapshot: torch.Tensor | None = None
        self.gen = torch.Generator(device=device)

    # ---------------------------------------------------------------------------------------- forward operator

    def images(self, F: torch.Tensor, radius_px: float | None) -> torch.Tensor:
        """Centred transforms (B, n, n) -> low-passed real-space images in units of the noise s.d."""
        filt = self.inside if radius_px is None else self.inside * torch.exp(-self.k2 / (2 * radius_px ** 2))
        return ifft2c(F * filt).real / self.noise_sd

    def fake(self, proj: Any, batch: ImageBatch, rng: np.random.Generator, radius_px: float | None
             ) -> torch.Tensor:
        """Simulated images for the CTFs (and, with known poses, the rotations) of ``batch``."""
        B, dev = len(batch.rows), self.device
        A = batch.rotations.to(dev) if self.s.poses_known else random_rotations(B, rng, dev)
        z = torch.randn((B, self.s.zdim), generator=self.gen, device=dev) if self.s.zdim else None
        F = self.G.slices(proj, A, z) * batch.ctf.to(dev)
        if self.s.shift_range_A > 0:
            r = self.s.shift_range_A / self.apix_n
            F = apply_origin(F, (torch.rand((B, 2), generator=self.gen, device=dev) * 2 - 1) * r)
        noise = torch.randn((B, self.n, self.n), generator=self.gen, device=dev) * self.noise_sd
        return self.images(F + fft2c(noise), radius_px)

    # ---------------------------------------------------------------------------------------- training

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        eps = torch.rand((len(real), 1, 1), generator=self.gen, device=self.device)
        x = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(self.D(x).sum(), x, create_graph=True)
        return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def train_step(self, batches: Iterator[tuple[int, ImageBatch]]) -> dict[str, float]:
        """``n_critic`` critic steps on fresh real batches, then one generator step; returns its losses."""
        s, t0 = self.s, time.time()
        rng = np.random.default_rng([self.seed, self.step, 0x6A])
        self.gen.manual_seed(int(rng.integers(2 ** 62)))
        radius = lowpass_radius_px(self.step, s, self.n, self.apix_n)
        with torch.no_grad():
            proj = self.G.projector()
        w_dist, gps = [], []
        for _ in range(s.n_critic):
            epoch, batch = next(batches)
            real = self.images(batch.images_ft.to(self.device), radius)
            with torch.no_grad():
                fake = self.fake(proj, batch, rng, radius)
            d_real, d_fake = self.D(real).mean(), self.D(fake).mean()
            gp = self.gradient_penalty(real, fake)
            self.opt_d.zero_grad(set_to_none=True)
            (d_fake - d_real + s.gp_weight * gp).backward()
            self.opt_d.step()
            w_dist.append(float((d_real - d_fake).detach()))
            gps.append(float(gp.detach()))
        g_loss = -self.D(self.fake(self.G.projector(), batch, rng, radius)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self.D.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.ema.mul_(EMA).add_(self.G.maps(), alpha=1 - EMA)
        self.step += 1
        if self.step == int(0.9 * s.steps):
            self.snapshot = self.average()[0]
        lowpass_A = self.n * self.apix_n / radius if radius else 2 * self.apix_n
        return {"step": self.step, "epoch": epoch, "wasserstein": float(np.mean(w_dist)),
                "gradient_penalty": float(np.mean(gps)), "generator_loss": float(g_loss.detach()),
                "lowpass_A": lowpass_A, "seconds": time.time() - t0}

    def average(self) -> torch.Tensor:
        """The moving average of the maps, divided by its weight (it starts from zero maps)."""
        return self.ema / (1 - EMA ** max(self.step, 1))

    # ---------------------------------------------------------------------------------------- checkpoints

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"ema": self.ema, **{f"G.{k}": v for k, v in self.G.state_dict().items()},
               **{f"D.{k}": v for k, v in self.D.state_dict().items()}}
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            for i, st in opt.state_dict()["state"].items():
                out.update({f"{name}.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot
        return out

    def load(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        dev = self.device
        self.G.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
        self.D.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("D.")})
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(name + "."):
                    _, i, key = k.split(".", 2)
                    state.setdefault(int(i), {})[key] = v.to(dev) if key != "step" else v
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        self.ema = tensors["ema"].to(dev)
        self.snapshot = tensors["snapshot"].to(dev) if "snapshot" in tensors else None
        self.step = step


def _save(path: Path, trainer: GanTrainer, epoch: int, history: list[dict[str, float]],
          settings: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "step": str(trainer.step), "epoch": str(epoch), "history": json.dumps(history),
            "settings": json.dumps(settings, sort_keys=True)}
    write_weights(path, trainer.tensors(), meta, checkpoint=True)


def _read(path: Path) -> tuple[tuple[dict[str, torch.Tensor], int, int, list[dict[str, float]]], dict[str, Any]]:
    tensors, meta = read_weights(path)
    if meta.get("format") != FORMAT or "ema" not in tensors:
        raise InputError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
    try:
        return ((tensors, int(meta["step"]), int(meta["epoch"]), json.loads(meta["history"])),
                json.loads(meta["settings"]))
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"the checkpoint's metadata is incomplete ({exc})") from None


def fit_cryogan(particles: Any, s: GanSettings, device: torch.device | str = "cpu", seed: int = 0,
                log: logging.Logger | None = None, checkpoint: Path | None = None, resume: bool = False) -> GanFit:
    """Train the generator against the critic for ``s.steps`` generator steps; the state is written to
    ``checkpoint`` every ``s.checkpoint_every`` steps and at the end, and ``resume`` continues from it
    (InputError when it was written with other settings)."""
    log = log or logging.getLogger("cryohet.cryogan")
    device = torch.device(device)
    source = getattr(particles, "source", None)
    box, apix = int(particles.box), float(particles.apix)
    lattice = plan(len(particles.euler_deg), box, apix, s, device, source)
    n = lattice.box
    prep = ImagePreparer(particles, lattice, device=device)
    noise_var = corner_noise_variance(particles, n, seed)
    diameter_A = s.diameter_A if s.diameter_A > 0 else 0.9 * box * apix
    radius_px = min(n / 2 - 1, diameter_A / 2 / lattice.apix)
    scale = signal_scale(particles, prep, noise_var, 2 * radius_px, seed)
    settings = {**asdict(s), "particles": str(source), "n_particles": len(particles.euler_deg), "box": box,
                "work_box": n, "seed": seed}
    for key in ("steps", "checkpoint_every"):               # a resumed run may go on for longer
        settings.pop(key)
    trainer = GanTrainer(s, lattice, noise_var, scale, radius_px, device, seed)
    history: list[dict[str, float]] = []
    epoch = 0
    found = load_checkpoint(checkpoint, _read, settings, log) if resume and checkpoint else None
    if found is not None:
        used, (tensors, step, epoch, history) = found
        trainer.load(tensors, step)
        log.info("resumed from %s at generator step %d", used, step)
    log.info("CryoGAN: %d particles, box %d -> working box %d (%.2f Å/px), %s poses, zdim %d, noise σ² %.4g "
             "(corners), voxel scale %.3g, %d generator steps × %d critic steps, batches of %d",
             len(particles.euler_deg), box, n, lattice.apix, "known" if s.poses_known else "uniform random",
             s.zdim, noise_var, scale, s.steps, s.n_critic, s.batch_size)
    batches = real_batches(particles, prep, s.batch_size, seed, epoch)
    every = max(1, s.steps // 20)
    while trainer.step < s.steps:
        h = trainer.train_step(batches)
        epoch = int(h["epoch"])
        history.append(h)
        if trainer.step % every == 0 or trainer.step == s.steps:
            log.info("step %d/%d: Wasserstein estimate %.4g, gradient penalty %.3g, low-pass %.1f Å, %.2f s/step",
                     trainer.step, s.steps, h["wasserstein"], h["gradient_penalty"], h["lowpass_A"], h["seconds"])
        if checkpoint is not None and (trainer.step % s.checkpoint_every == 0 or trainer.step == s.steps):
            _save(checkpoint, trainer, epoch, history, settings)
    maps = trainer.average().cpu()
    change = math.nan
    if trainer.snapshot is not None:
        change = float((maps[0] - trainer.snapshot.cpu()).norm() / maps[0].norm().clamp_min(1e-30))
    return GanFit(maps.numpy(), lattice, noise_var, scale, history, change)
