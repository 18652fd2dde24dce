"""The neural hyper-molecule V(z, k) of cryoDRGN (survey section 7.2) and the VAE around it.

Decoder: an MLP over positional features of a 3-D spatial frequency ``k`` (cycles/pixel, |k| < 1/2)
plus the latent ``z``; it returns the volume's Fourier transform at ``k`` (domain ``fourier``: real and
imaginary parts, evaluated on the half-space kz < 0 and completed by Hermitian symmetry so that every
map is real) or its Hartley transform (domain ``hartley``: one value). The first layer is split into
a positional part and a latent part, which is the same function as cryoDRGN's concatenated input
but computes the latent part once per image instead of once per frequency.

Encoder: an MLP from the centred, CTF-phase-flipped transform of a particle image (real and imaginary
parts on the half-plane inside the resolution circle) to the mean and log-variance of q(z | image).

Files: ``model.safetensors`` holds the weights and, in its metadata, the configuration (JSON) and
the data scale; nothing is ever unpickled.
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

from cryohet.atomic import atomic_path
from cryohet.errors import InputError

MODEL_FORMAT = "cryohet-vae-1"


@dataclass
class VAEConfig:
    """Architecture and data geometry of a VAE model (JSON-serialisable)."""

    box: int                      # pixels of the (cropped) images the model was trained on
    apix: float                   # Å/pixel at that box
    zdim: int = 8
    enc_layers: int = 3
    enc_dim: int = 256
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VAEConfig:
        names = {f.name for f in fields(VAEConfig)}
        return VAEConfig(**{k: v for k, v in d.items() if k in names})

    def architecture(self) -> dict[str, Any]:
        """The fields that must agree for weights to be reused."""
        d = asdict(self)
        for k in ("data_scale", "seed"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------------
# Frequency lattices


def half_plane_points(box: int, max_freq: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of the centred (box, box) transform that the model sees, and their frequencies.

    Returns (flat indices into box*box, kxy (M, 2) cycles/pixel): the half-plane ky < 0 or
    (ky = 0, kx < 0) inside |k| < max_freq. The other half is the complex conjugate (real images)
    and the zero frequency is left out (it holds the image offset), as in cryoDRGN.
    """
    c = torch.arange(box, dtype=torch.float64) - box // 2
    ky, kx = torch.meshgrid(c / box, c / box, indexing="ij")
    r = torch.sqrt(kx**2 + ky**2)
    half = (ky < 0) | ((ky == 0) & (kx < 0))
    keep = half & (r < max_freq - 1e-9)
    flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
    kxy = torch.stack([kx.reshape(-1)[flat], ky.reshape(-1)[flat]], 1).to(torch.float32)
    return flat, kxy


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


class Encoder(nn.Module):
    """Image features (B, in_dim) -> (mu, logvar), each (B, zdim)."""

    def __init__(self, in_dim: int, cfg: VAEConfig):
        super().__init__()
        self.zdim = cfg.zdim
        self.mlp = ResidMLP(in_dim, cfg.enc_layers, cfg.enc_dim, 2 * cfg.zdim, cfg.activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlp(x)
        return out[:, :self.zdim], out[:, self.zdim:]


class PositionalEncoding(nn.Module):
    """sin/cos features of 3-D frequencies k (cycles/pixel) -> (..., 6 * pe_dim)."""

    def __init__(self, cfg: VAEConfig, generator: torch.Generator | None = None):
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


class Decoder(nn.Module):
    """V(z, k): (B, M, 3) frequencies (cycles/pixel) and (B, zdim) latents -> (B, M, channels)."""

    def __init__(self, cfg: VAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.pe = PositionalEncoding(cfg, generator)
        self.channels = 2 if cfg.domain == "fourier" else 1
        self.lin_k = nn.Linear(self.pe.out_dim, cfg.dec_dim)
        self.lin_z = nn.Linear(cfg.zdim, cfg.dec_dim, bias=False) if cfg.zdim else None
        self.mlp = ResidMLP(0, cfg.dec_layers, cfg.dec_dim, self.channels, cfg.activation, first=nn.Identity())

    def raw(self, k: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The network itself at frequencies k (B, M, 3) (no symmetry applied)."""
        h = self.lin_k(self.pe(k))
        if self.lin_z is not None and z is not None:
            h = h + self.lin_z(z)[:, None, :]
        return self.mlp.body(h)

    def forward(self, k: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if self.channels == 1:
            return self.raw(k, z)
        # Hermitian symmetry: evaluate on the half-space kz < 0 (cryoDRGN's convention; on kz = 0 the
        # half-plane ky < 0, on that line kx <= 0) and take the complex conjugate elsewhere
        kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
        flip = ((kz > 0) | ((kz == 0) & ((ky > 0) | ((ky == 0) & (kx > 0))))).unsqueeze(-1)
        sign = 1.0 - 2.0 * flip.to(k.dtype)
        out = self.raw(k * sign, z)
        return torch.cat([out[..., :1], out[..., 1:] * sign], -1)


class HetVAE(nn.Module):
    """Encoder + decoder; ``in_dim`` = 2 * number of half-plane points the encoder sees."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(int(cfg.seed))
        flat, kxy = half_plane_points(cfg.box, cfg.max_freq)
        self.register_buffer("pix", flat, persistent=False)
        self.register_buffer("kxy", kxy, persistent=False)
        self.n_points = len(flat)
        self.encoder = Encoder(2 * self.n_points, cfg)
        self.decoder = Decoder(cfg, g)
        # initialise the layers from the configured seed (reproducible, independent of global RNG)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    bound = 1.0 / math.sqrt(mod.in_features)
                    mod.weight.uniform_(-bound, bound, generator=g)
                    if mod.bias is not None:
                        mod.bias.uniform_(-bound, bound, generator=g)

    def slice_coords(self, rot: torch.Tensor) -> torch.Tensor:
        """3-D frequencies of the half-plane points for poses ``rot`` = RELION matrices A (B, 3, 3).

        The central slice of a projection is F_V(Aᵀ (kx, ky, 0)); as rows, k @ A.
        """
        k2 = self.kxy.to(rot.dtype)
        return k2[None, :, 0:1] * rot[:, None, 0, :] + k2[None, :, 1:2] * rot[:, None, 1, :]

    def decode_slices(self, rot: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Predicted centred transforms (no CTF) at the half-plane points -> (B, M, 2) (re, im)."""
        k = self.slice_coords(rot)
        if self.decoder.channels == 2:
            return self.decoder(k, z)
        # Hartley: H(k) and H(-k) give re = (H(k) + H(-k)) / 2 and im = (H(-k) - H(k)) / 2
        m = k.shape[1]
        h = self.decoder(torch.cat([k, -k], 1), z)[..., 0]
        hp, hm = h[:, :m], h[:, m:]
        return torch.stack([(hp + hm) * 0.5, (hm - hp) * 0.5], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)


# ---------------------------------------------------------------------------------------------------
# Volumes


@torch.no_grad()
def decode_volumes(model: HetVAE, z: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
                   points_per_call: int = 1 << 16) -> np.ndarray:
    """Maps at latent points z (M, zdim) -> float32 (M, box, box, box) (z, y, x), RELION orientation."""
    cfg = model.cfg
    n = cfg.box
    z = torch.as_tensor(np.asarray(z, dtype=np.float32)).reshape(-1, cfg.zdim).to(device)
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
    was_training = model.training
    model.eval()
    out = np.empty((len(z), n, n, n), dtype=np.float32)
    for i in range(len(z)):
        vals = []
        for s in range(0, len(kpts), points_per_call):
            kk = kpts[s:s + points_per_call][None]
            if model.decoder.channels == 2:
                v = model.decoder.raw(kk, z[i:i + 1])[0].float()
                vals.append(torch.complex(v[:, 0], v[:, 1]))
            else:  # Hartley: F(k) = (H(k) + H(-k)) / 2 - i (H(k) - H(-k)) / 2
                h = model.decoder(torch.cat([kk, -kk], 1), z[i:i + 1])[0, :, 0].float()
                hp, hm = h[:len(h) // 2], h[len(h) // 2:]
                vals.append(torch.complex((hp + hm) * 0.5, (hm - hp) * 0.5))
        v = torch.cat(vals).to(torch.complex128).cpu() * cfg.data_scale
        F = torch.zeros(n * n * n, dtype=torch.complex128)
        F[sel] = v
        F[mirror] = torch.conj(v)
        F = F.reshape(n, n, n)
        vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F))).real
        out[i] = vol.numpy().astype(np.float32)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------
# Files


def save_model(path: str | Path, model: HetVAE, extra: dict[str, str] | None = None) -> Path:
    """Write the weights as safetensors with the configuration in its metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": MODEL_FORMAT, "config": model.cfg.to_json(), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; InputError when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors on garbage
        raise InputError(path, f"not a safetensors model file ({exc})") from None
    return tensors, meta


def load_model(path: str | Path, device: torch.device | str = "cpu") -> HetVAE:
    """Rebuild a :class:`HetVAE` from a file written by :func:`save_model`."""
    tensors, meta = read_model_file(path)
    if meta.get("format") != MODEL_FORMAT or "config" not in meta:
        raise InputError(path, f"not a cryohet VAE model (format {meta.get('format')!r})")
    cfg = VAEConfig.from_dict(json.loads(meta["config"]))
    model = HetVAE(cfg)
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()
             if not k.startswith("optim.") and not k.startswith("rng.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the stored configuration ({exc})") from None
    return model.to(device)


class NeuralVolumeModel:
    """A trained VAE decoder as a ``cryohet.models.base.VolumeModel``."""

    def __init__(self, model: HetVAE, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.device = device
        self.latent_dim = model.cfg.zdim
        self.box = model.cfg.box
        self.apix = model.cfg.apix

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps at latent points ``z`` (M, latent_dim) -> float32 (M, box, box, box), RELION orientation."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"latent points have {z.shape[1]} coordinates, the model has {self.latent_dim}")
        return decode_volumes(self.model, z, self.device)


def load_run_model(run_dir: str | Path, model_path: str | Path) -> NeuralVolumeModel:
    """The VolumeModel of a ``train-vae`` run (``MODEL_LOADERS['vae']``)."""
    from cryohet.device import pick_device

    return NeuralVolumeModel(load_model(model_path), pick_device("auto"))
