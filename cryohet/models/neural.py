"""The neural hyper-molecule V(z, k) of cryoDRGN (survey section 7.2), a volume model of the engine's contract.

An MLP over positional features of a 3-D spatial frequency ``k`` (cycles/pixel, |k| < 1/2) plus the latent ``z``
returns the volume's Fourier transform at ``k`` (domain ``fourier``: real and imaginary parts, evaluated on the
half-space kz < 0 and completed by Hermitian symmetry so that every map is real) or its Hartley transform (domain
``hartley``: one value). The first layer is split into a positional part and a latent part, which is the same
function as cryoDRGN's concatenated input but computes the latent part once per image instead of once per frequency.

With ``anchor`` the network is a residual on a fixed base map (the homogeneous reconstruction of the same
particles, set by ``set_base``): V(z, k) = F_base(k) + MLP(z, k), the base sliced exactly as relion_project does
(``geometry.project.Projector``) and the MLP's output layer starting at zero, so that a network which learns
nothing gives the base map at every latent point.

How ``z`` is inferred (an encoder, a per-particle table) lives in ``cryohet.inference``. Files: ``model.safetensors``
holds the weights (and the base map, ``decoder.base_map``) and, in its metadata, the configuration (JSON) and the
data scale; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cryohet.errors import InputError
from cryohet.geometry.fourier import fft3c
from cryohet.geometry.project import Projector
from cryohet.io.weights import read_weights, write_weights

MODEL_TYPE = "vae"  # the run record's model_type that load_run_model reads (cryohet.models.base)
MODEL_FORMAT = "cryohet-vae-1"


@dataclass
class VolumeConfig:
    """Architecture and data geometry of a neural volume (JSON-serialisable)."""

    box: int                      # pixels of the (cropped) images the model was trained on
    apix: float                   # Å/pixel at that box
    zdim: int = 8
    dec_layers: int = 3
    dec_dim: int = 256
    pe_type: str = "gaussian"     # gaussian (random Fourier features) or geom (survey eq. 9)
    pe_dim: int = 0               # frequencies per axis; 0 = box // 2
    feat_sigma: float = 0.5       # width of the Gaussian feature frequencies
    domain: str = "fourier"       # fourier or hartley
    max_freq: float = 0.5         # radius of the resolution circle, cycles/pixel (0.5 = Nyquist)
    activation: str = "relu"
    data_scale: float = 1.0       # images' transforms were divided by this before training
    seed: int = 0
    anchor: bool = False          # the network is a residual on a fixed base map (``NeuralVolume.set_base``)
    anchor_fraction: float = 1.0  # the base is this fraction of the map given to ``set_base``

    def __post_init__(self) -> None:
        if self.pe_dim <= 0:
            self.pe_dim = self.box // 2
        if self.box % 2:
            raise ValueError(f"the box must be even, got {self.box}")
        if self.domain not in ("fourier", "hartley"):
            raise ValueError(f"unknown domain {self.domain!r}")
        if self.pe_type not in ("gaussian", "geom"):
            raise ValueError(f"unknown positional encoding {self.pe_type!r}")
        if not 0 < self.max_freq <= 0.5:
            raise ValueError(f"max_freq must be in (0, 0.5] cycles/pixel, got {self.max_freq}")
        if not 0 < self.anchor_fraction <= 1:
            raise ValueError(f"anchor_fraction must be in (0, 1], got {self.anchor_fraction}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VolumeConfig:
        names = {f.name for f in fields(VolumeConfig)}
        return VolumeConfig(**{k: v for k, v in d.items() if k in names})

    def architecture(self) -> dict[str, Any]:
        """The fields that must agree for weights to be reused."""
        d = asdict(self)
        for k in ("data_scale", "seed"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------------
# Networks


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU()}[name]


class ResidMLP(nn.Module):
    """cryoDRGN's ResidLinearMLP: Linear(in, h), act, [x + Linear(h, h)(x), act] * layers, Linear(h, out)."""

    def __init__(self, in_dim: int, layers: int, hidden: int, out_dim: int, activation: str = "relu",
                 first: nn.Module | None = None):
        super().__init__()
        self.first = first if first is not None else nn.Linear(in_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out_dim)
        self.act = _activation(activation)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        h = self.act(h)
        if self.hidden:
            # x + W x + b as one product with W + I: no separate residual add (same function and gradients)
            eye = torch.eye(self.hidden[0].in_features, device=h.device, dtype=self.hidden[0].weight.dtype)
            for lin in self.hidden:
                h = self.act(F.linear(h, lin.weight + eye, lin.bias))
        return self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.first(x))


class PositionalEncoding(nn.Module):
    """sin/cos features of 3-D frequencies k (cycles/pixel) -> (..., 6 * pe_dim)."""

    def __init__(self, cfg: VolumeConfig, generator: torch.Generator | None = None):
        super().__init__()
        d, half = cfg.pe_dim, cfg.box // 2
        if cfg.pe_type == "gaussian":
            # cryoDRGN: 3 * pe_dim random directions, N(0, sigma^2), times box/2, on coordinates in [-1/2, 1/2]
            freqs = torch.randn((3 * d, 3), generator=generator) * cfg.feat_sigma * half
        else:
            # survey eq. (9): r N pi (2/N)^(2i/N), i = 1..N/2, per axis (coordinates in [-1/2, 1/2])
            n = cfg.box
            w = n * math.pi * (2.0 / n) ** (torch.arange(1, d + 1, dtype=torch.float64) / d)
            freqs = torch.zeros(3 * d, 3, dtype=torch.float64)
            for a in range(3):
                freqs[a * d:(a + 1) * d, a] = w
            freqs = freqs.to(torch.float32)
        self.register_buffer("freqs", freqs.t().contiguous())  # (3, 3 * pe_dim)
        self.out_dim = 6 * d

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        # the phases reach tens of radians: always float32 (bfloat16 would quantise them by ~0.1 rad)
        with torch.autocast(k.device.type, enabled=False):
            arg = k.float() @ self.freqs
            return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def init_linear(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every Linear layer of ``module`` (in module order) from ``generator``: reproducible from a seed."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.Linear):
                bound = 1.0 / math.sqrt(mod.in_features)
                mod.weight.uniform_(-bound, bound, generator=generator)
                if mod.bias is not None:
                    mod.bias.uniform_(-bound, bound, generator=generator)


def slice_frequencies(rot: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    """3-D frequencies (B, M, 3) of the central slices at image frequencies ``kxy`` (M, 2) for poses ``rot`` (RELION
    matrices A, (B, 3, 3)): the slice of a projection is F_V(Aᵀ (kx, ky, 0)); as rows, k @ A."""
    k2 = kxy.to(rot.dtype)
    return k2[None, :, 0:1] * rot[:, None, 0, :] + k2[None, :, 1:2] * rot[:, None, 1, :]


class NeuralVolume(nn.Module):
    """V(z, k): central slices at given rotations and latents, and maps at latent points.

    ``generator`` draws the positional-encoding frequencies; without one the layers are also initialised from
    ``cfg.seed`` (an inference module that owns the volume initialises them itself, see ``init_linear``).
    """

    def __init__(self, cfg: VolumeConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        g = generator if generator is not None else torch.Generator().manual_seed(int(cfg.seed))
        self.pe = PositionalEncoding(cfg, g)
        self.channels = 2 if cfg.domain == "fourier" else 1
        self.lin_k = nn.Linear(self.pe.out_dim, cfg.dec_dim)
        self.lin_z = nn.Linear(cfg.zdim, cfg.dec_dim, bias=False) if cfg.zdim else None
        self.mlp = ResidMLP(0, cfg.dec_layers, cfg.dec_dim, self.channels, cfg.activation, first=nn.Identity())
        if cfg.anchor:
            self.register_buffer("base_map", torch.zeros((cfg.box,) * 3))
        self._base_proj: tuple[tuple[Any, ...], Projector] | None = None
        if generator is None:
            init_linear(self, g)

    def set_base(self, base_map: torch.Tensor | np.ndarray) -> None:
        """Anchor on ``cfg.anchor_fraction`` × ``base_map`` (box³, real space, the maps' units) and zero the
        network's output layer: the volume is then that base at every latent point until the network learns a
        residual (with a fraction below 1, the rest of the mean first: the network's output layer is drawn into use
        from the first steps, and with it the latent)."""
        if not self.cfg.anchor:
            raise ValueError("set_base needs a volume configured with anchor=True")
        base = torch.as_tensor(np.asarray(base_map, dtype=np.float32))
        if tuple(base.shape) != (self.cfg.box,) * 3:
            raise ValueError(f"the base map must be {self.cfg.box}³ voxels, got {tuple(base.shape)}")
        with torch.no_grad():
            self.base_map.copy_(base * self.cfg.anchor_fraction)
            self.mlp.out.weight.zero_()
            self.mlp.out.bias.zero_()

    def _base_slices(self, k: torch.Tensor) -> torch.Tensor:
        """The base map's transform at 3-D frequencies k (B, M, 3) cycles/pixel -> (B, M, 2), data-scale units."""
        b = self.base_map
        key = (b.device, b.data_ptr(), b._version)
        if self._base_proj is None or self._base_proj[0] != key:  # built once per base map and device
            self._base_proj = (key, Projector(b))
        proj = self._base_proj[1]
        with torch.autocast(k.device.type, enabled=False):
            v = proj.sample(k.float() * (self.cfg.box * proj.pad))
        return torch.stack([v.real, v.imag], -1) / self.cfg.data_scale

    @property
    def latent_dim(self) -> int:
        return self.cfg.zdim

    @property
    def box(self) -> int:
        return self.cfg.box

    @property
    def apix(self) -> float:
        return self.cfg.apix

    def raw(self, k: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The network itself at frequencies k (B, M, 3) (no symmetry applied)."""
        h = self.lin_k(self.pe(k))
        if self.lin_z is not None and z is not None:
            h = h + self.lin_z(z)[:, None, :]
        return self.mlp.body(h)

    def forward(self, k: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Values at frequencies k (B, M, 3) for latents z (B, zdim) -> (B, M, channels)."""
        if self.channels == 1:
            return self.raw(k, z)
        # Hermitian symmetry: evaluate on the half-space kz < 0 (cryoDRGN's convention; on kz = 0 the
        # half-plane ky < 0, on that line kx <= 0) and take the complex conjugate elsewhere
        kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
        flip = ((kz > 0) | ((kz == 0) & ((ky > 0) | ((ky == 0) & (kx > 0))))).unsqueeze(-1)
        sign = 1.0 - 2.0 * flip.to(k.dtype)
        out = self.raw(k * sign, z)
        return torch.cat([out[..., :1], out[..., 1:] * sign], -1)

    def slices(self, rot: torch.Tensor, z: torch.Tensor | None, kxy: torch.Tensor,
               base: torch.Tensor | None = None) -> torch.Tensor:
        """Central slices (no CTF) at image frequencies ``kxy`` (M, 2) cycles/pixel for poses ``rot`` (RELION
        matrices A, (B, 3, 3)) and latents ``z`` (B, zdim) -> (B, M, 2) real and imaginary parts, in units of the
        data scale. The slice of a projection is F_V(Aᵀ (kx, ky, 0)); as rows, k @ A. ``base``: the anchored base
        map's slices at the same poses and frequencies (:meth:`base_slices`) when already computed."""
        k = slice_frequencies(rot, kxy)
        if self.channels == 2:
            out = self(k, z)
        else:  # Hartley: H(k) and H(-k) give re = (H(k) + H(-k)) / 2 and im = (H(-k) - H(k)) / 2
            m = k.shape[1]
            h = self(torch.cat([k, -k], 1), z)[..., 0]
            hp, hm = h[:, :m], h[:, m:]
            out = torch.stack([(hp + hm) * 0.5, (hm - hp) * 0.5], -1)
        if not self.cfg.anchor:
            return out
        return out + (self._base_slices(k) if base is None else base)

    def base_slices(self, rot: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
        """The anchored base map's central slices alone (as :meth:`slices`, data-scale units) -> (B, M, 2)."""
        return self._base_slices(slice_frequencies(rot, kxy))

    @torch.no_grad()
    def volumes(self, z: np.ndarray | torch.Tensor, points_per_call: int = 1 << 16) -> np.ndarray:
        """Maps at latent points z (M, zdim) -> float32 (M, box, box, box) (z, y, x), RELION orientation."""
        cfg = self.cfg
        n = cfg.box
        device = self.lin_k.weight.device
        z = torch.as_tensor(np.asarray(z, dtype=np.float32))
        z = z.reshape(-1, cfg.zdim) if cfg.zdim else torch.zeros((max(1, len(z)), 0))
        if z.shape[1] != cfg.zdim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {cfg.zdim}")
        z = z.to(device)
        c = (torch.arange(n, dtype=torch.float64) - n // 2) / n
        gz, gy, gx = torch.meshgrid(c, c, c, indexing="ij")
        r = torch.sqrt(gx**2 + gy**2 + gz**2)
        # canonical half-space: kz < 0, or kz = 0 and ky < 0, or kz = ky = 0 and kx <= 0
        half = (gz < 0) | ((gz == 0) & (gy < 0)) | ((gz == 0) & (gy == 0) & (gx <= 0))
        sel = torch.nonzero((half & (r < cfg.max_freq - 1e-9)).reshape(-1)).squeeze(1)
        kpts = torch.stack([gx.reshape(-1)[sel], gy.reshape(-1)[sel], gz.reshape(-1)[sel]], 1).to(torch.float32)
        # mirror index of each point: (-k) -> index n - i (all selected points have i > 0)
        iz, iy, ix = sel // (n * n), (sel // n) % n, sel % n
        mirror = ((n - iz) % n) * n * n + ((n - iy) % n) * n + (n - ix) % n
        kpts = kpts.to(device)
        # anchored: inside the fitted circle the base plus the network; between it and Nyquist (a --res_limit_A
        # coarser than Nyquist), where the network has learnt nothing, the whole homogeneous map (the base over its
        # fraction); zero beyond Nyquist
        if self.cfg.anchor:
            base_ft = fft3c(self.base_map.detach().cpu().double()).reshape(-1)
            base = base_ft[sel]
            outside = torch.where(r.reshape(-1) < 0.5 - 1e-9, base_ft / cfg.anchor_fraction, 0)
        else:
            base, outside = torch.zeros(len(sel), dtype=torch.complex128), torch.zeros(n**3, dtype=torch.complex128)
        was_training = self.training
        self.eval()
        out = np.empty((len(z), n, n, n), dtype=np.float32)
        for i in range(len(z)):
            vals = []
            for s in range(0, len(kpts), points_per_call):
                kk = kpts[s:s + points_per_call][None]
                if self.channels == 2:
                    v = self.raw(kk, z[i:i + 1])[0].float()
                    vals.append(torch.complex(v[:, 0], v[:, 1]))
                else:  # Hartley: F(k) = (H(k) + H(-k)) / 2 - i (H(k) - H(-k)) / 2
                    h = self(torch.cat([kk, -kk], 1), z[i:i + 1])[0, :, 0].float()
                    hp, hm = h[:len(h) // 2], h[len(h) // 2:]
                    vals.append(torch.complex((hp + hm) * 0.5, (hm - hp) * 0.5))
            v = torch.cat(vals).to(torch.complex128).cpu() * cfg.data_scale + base
            F = outside.clone()
            F[sel] = v
            F[mirror] = torch.conj(v)
            vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F.reshape(n, n, n)))).real
            out[i] = vol.numpy().astype(np.float32)
        self.train(was_training)
        return out


# ---------------------------------------------------------------------------------------------------
# Files


def save_model(path: str | Path, volume: NeuralVolume, inference: dict[str, Any],
               tensors: dict[str, torch.Tensor], extra: dict[str, str] | None = None) -> Path:
    """Write a trained model: ``tensors`` (the volume's under ``decoder.``, the inference's under its own prefix),
    the volume configuration and ``inference`` (its kind and settings, JSON) in the metadata (atomic)."""
    meta = {"format": MODEL_FORMAT, "config": volume.cfg.to_json(), "inference": json.dumps(inference, sort_keys=True),
            **(extra or {})}
    return write_weights(path, tensors, meta)


def read_model(path: str | Path) -> tuple[VolumeConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(volume configuration, inference settings, tensors, metadata) of a model file; InputError if not one."""
    tensors, meta = read_weights(path)
    if meta.get("format") != MODEL_FORMAT or "config" not in meta:
        raise InputError(path, f"not a cryohet neural model (format {meta.get('format')!r})")
    return VolumeConfig.from_dict(json.loads(meta["config"])), stored_inference(meta), tensors, meta


def stored_inference(meta: dict[str, str]) -> dict[str, Any]:
    """The inference settings in a model file's or checkpoint's metadata (cryohet 0.1's: a VAE's encoder)."""
    if "inference" in meta:
        return json.loads(meta["inference"])
    raw = json.loads(meta.get("config", "{}"))
    return {"kind": "amortised", "enc_layers": raw.get("enc_layers", 3), "enc_dim": raw.get("enc_dim", 256)}


def load_volume(path: str | Path, device: torch.device | str = "cpu") -> NeuralVolume:
    """The trained volume (decoder) of a model file."""
    cfg, _, tensors, _ = read_model(path)
    volume = NeuralVolume(cfg)
    state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    try:
        volume.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the stored configuration ({exc})") from None
    return volume.to(device).eval()


def load_run_model(run_dir: str | Path, model_path: str | Path) -> NeuralVolume:
    """The VolumeModel of a ``train-vae`` run."""
    from cryohet.device import pick_device

    return load_volume(model_path, pick_device("auto"))
