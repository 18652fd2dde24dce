"""Memory plans of the VAE's trainer and of principal volumes (#17 item 3): the bytes a run needs on its device,
estimated from its settings before anything is allocated, and a refusal (``cryohet.device.refuse_unless_fits``:
an InputError naming the particles, the setting and its largest value that fits) when they do not fit.

Estimates are deliberately on the high side (float32 everywhere, mixed precision halves part of it); the test
compares the VAE's with the tensors autograd actually keeps for a step, docs/benchmarks.md both with measured peaks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from cryohet.device import refuse_unless_fits

#: share of the device's free memory a plan may use (the rest: the framework, fragmentation, other processes)
MEMORY_FRACTION = 0.8
F32 = 4


@dataclass(frozen=True)
class VaeShape:
    """What a train-vae step's memory depends on. ``n_points``: half-plane pixels fitted per image; ``pe_features``:
    the decoder's positional features per point (6·pe_dim); ``enc_dim`` 0: no encoder (auto-decoder, whose
    per-particle table of ``n_particles`` × 2·zdim then lives on the device); ``n_filters``: the encoder's pose-aware
    filter maps (``pose_filters``), each ``filter_voxels`` complex values, read at ``filter_points`` pixels;
    ``fixed_filters``: the filters are held fixed (``--filters_from``), so they have no gradient or Adam moments;
    ``learnt_filters``: a second bank beside fixed ones (``--learnt_filters``), learnt, each ``learnt_voxels``
    complex values read at ``learnt_points`` pixels."""

    n_points: int
    pe_features: int
    dec_dim: int
    dec_layers: int
    zdim: int
    enc_dim: int
    enc_layers: int
    hartley: bool = False
    n_particles: int = 0
    n_filters: int = 0
    filter_voxels: int = 0
    filter_points: int = 0
    fixed_filters: bool = False
    learnt_filters: int = 0
    learnt_voxels: int = 0
    learnt_points: int = 0

    def filter_values(self) -> int:
        """The (first bank's) filter maps' stored values (real and imaginary parts)."""
        return 2 * self.n_filters * self.filter_voxels

    def n_params(self) -> int:
        """Trainable parameters: decoder, and the encoder (input: real and imaginary parts of every point) or the
        auto-decoder's latent table."""
        d, out = self.dec_dim, 1 if self.hartley else 2
        dec = (self.pe_features + 1) * d + self.zdim * d + self.dec_layers * (d * d + d) + (d + 1) * out
        if self.enc_dim:
            e, k = self.enc_dim, self.n_filters + self.learnt_filters
            learnt = (0 if self.fixed_filters else self.filter_values()) + 2 * self.learnt_filters * self.learnt_voxels
            first = (k + 1) * e + learnt if k else (2 * self.n_points + 1) * e
            return dec + first + self.enc_layers * (e * e + e) + (e + 1) * 2 * self.zdim
        return dec + self.n_particles * 2 * self.zdim

    def fixed_bytes(self) -> int:
        """Parameters, their gradients and Adam's two moments, and fixed filters, bytes."""
        return 4 * F32 * self.n_params() + (F32 * self.filter_values() if self.fixed_filters else 0)

    def image_bytes(self) -> int:
        """Bytes per image of a batch: the decoder's activations kept for the backward pass at every evaluated
        point (positional features, each hidden layer's output, two layers' gradients at once), the encoder's,
        and the batch's data (the points' values, CTF and the encoder's input)."""
        evaluations = self.n_points * (2 if self.hartley else 1)
        per_point = self.pe_features + (self.dec_layers + 3) * self.dec_dim + 16
        encoder = 2 * self.n_points + (self.enc_layers + 3) * self.enc_dim if self.enc_dim else 0
        if self.n_filters:  # the image's adjoint on the filters' grid, and 16 corners' indices and weights per pixel
            encoder += 2 * self.filter_voxels + 96 * self.filter_points
        if self.learnt_filters:
            encoder += 2 * self.learnt_voxels + 96 * self.learnt_points
        return F32 * (evaluations * per_point + encoder + 5 * self.n_points)

    def step_bytes(self, batch: int) -> int:
        """Device memory of a training step at ``batch`` images (per rank), bytes."""
        return self.fixed_bytes() + batch * self.image_bytes()


def ranks() -> int:
    """Ranks of a torchrun launch (1 without one): each holds batch / ranks images."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def check_vae_fits(shape: VaeShape, batch_size: int, n_particles: int, device: torch.device | str,
                   source: str | os.PathLike, host_bytes: int = 0) -> int:
    """Refuse a train-vae run whose step at global batch ``batch_size`` does not fit on ``device`` (``host_bytes``:
    the loader's memory, counted when the device is the CPU), naming the largest batch size that fits, or, when
    not even one image does, the networks to narrow. A batch holds at most the run's ``n_particles`` images.
    Returns the planned bytes."""
    per_rank = max(1, min(batch_size, n_particles) // ranks())
    extra = host_bytes if torch.device(device).type == "cpu" else 0

    def fits(usable: float) -> str:
        b = int((usable - extra - shape.fixed_bytes()) // shape.image_bytes())
        if b >= 1:
            return f"--batch_size {b * ranks()}"
        return "no batch at this box and network width"

    need = shape.step_bytes(per_rank) + extra
    refuse_unless_fits(need, device, MEMORY_FRACTION, source,
                       f"a training step of {per_rank} images of {shape.n_points} fitted pixels with a "
                       f"{shape.dec_layers} × {shape.dec_dim} decoder", fits,
                       "lower --batch_size to it, or Fourier-crop the images (--crop_box), limit the resolution "
                       "(--res_limit_A) or narrow the networks (--dec_dim, --enc_dim)")
    return need


@dataclass(frozen=True)
class PvShape:
    """What principal volumes' memory depends on: working box ``n`` (after Fourier cropping), padding ``pad``,
    components ``n_components``, resolution radius ``radius_px`` (pixels of the working box), ``batch`` images,
    and the ``n_particles`` whose prepared images are cached on the device when they fit in ``cache_mb``."""

    n: int
    pad: int
    n_components: int
    radius_px: float
    batch: int
    n_particles: int
    cache_mb: float

    def bytes(self) -> int:
        """Peak device memory, bytes: three float64/int64 padded grids (radii, voxel table, resolution limit),
        J = K + 1 maps as complex128 padded grids twice (the M-step's grids and their transform) plus their
        projectors' complex64 grids, the kept voxels' normal equations (float32, and three float64 copies while
        they are solved), the solutions, a batch's insertion terms (a batch holds at most the run's particles), and
        the image cache."""
        J, P = self.n_components + 1, self.pad * self.n
        grid = P ** 3
        voxels = 4 / 3 * math.pi * ((self.radius_px + 1.5) * self.pad) ** 3
        channels = 2 * J + J * (J + 1) // 2 + J
        pixels = math.pi * (self.radius_px + 1) ** 2 / 2
        cache = self.n_particles * pixels * 12
        total = (24 * grid + J * grid * (32 + 8) + 28 * voxels * channels + 24 * J * voxels
                 + 4 * F32 * min(self.batch, self.n_particles) * pixels * channels)
        return int(total + (cache if cache <= self.cache_mb * 2**20 else 0))


def check_pv_fits(shape: PvShape, device: torch.device | str, source: str | os.PathLike, apix: float) -> int:
    """Refuse principal volumes whose plan does not fit on ``device``, naming the most components that fit at this
    resolution, or, when not even one does, the largest batch at which the asked components fit, or the finest
    resolution (Å; ``apix``: of the working box) at which they fit. Returns the planned bytes."""
    def fits(usable: float) -> str:
        k = next((k for k in range(shape.n_components - 1, 0, -1)
                  if replace(shape, n_components=k).bytes() <= usable), 0)
        if k:
            return f"--n_components {k}"
        b = next((b for b in _halvings(min(shape.batch, shape.n_particles))
                  if replace(shape, batch=b).bytes() <= usable), 0)
        if b:
            return f"--batch_size {b}"
        for n in range(shape.n - 2, 7, -2):
            radius = shape.radius_px * n / shape.n
            if replace(shape, n=n, radius_px=radius).bytes() <= usable:
                return f"--resolution_A {math.ceil(10 * shape.n * apix / radius) / 10:g} (a working box of {n})"
        return "no working box of 8 pixels or more"

    refuse_unless_fits(shape.bytes(), device, MEMORY_FRACTION, source,
                       f"principal volumes with {shape.n_components} components at a working box of {shape.n} "
                       f"(padding {shape.pad})", fits,
                       "use that setting, or fewer components, a smaller --batch_size, a coarser --resolution_A or "
                       "--pad 1")
    return shape.bytes()


def _halvings(n: int) -> list[int]:
    """n // 2, n // 4, ... down to 1."""
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out
