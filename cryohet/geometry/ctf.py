"""The contrast transfer function, exactly as RELION computes it (ctf.h, CTF::getCTF)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from cryohet.geometry.fourier import freq_grid_2d


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each an array of shape (N,), RELION's names and units."""

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amp_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    def take(self, idx) -> CTFParams:
        return CTFParams(**{f.name: np.asarray(getattr(self, f.name))[idx] for f in fields(self)})

    def to_torch(self, device: torch.device | str = "cpu", dtype=torch.float64) -> dict[str, torch.Tensor]:
        return {f.name: torch.as_tensor(np.asarray(getattr(self, f.name), dtype=np.float64), device=device,
                                        dtype=dtype) for f in fields(self)}

    @staticmethod
    def broadcast(n: int, **values) -> CTFParams:
        """Build from scalars or arrays; missing optional fields get RELION's defaults."""
        defaults = dict(phase_shift_deg=0.0, bfactor_A2=0.0, scale=1.0)
        out = {}
        for f in fields(CTFParams):
            v = values.get(f.name, defaults.get(f.name))
            if v is None:
                raise ValueError(f"CTF parameter {f.name} is missing")
            out[f.name] = np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()
        return CTFParams(**out)


def electron_wavelength_A(voltage_kV: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å (RELION: 12.2643247 / sqrt(V (1 + 0.978466e-6 V)))."""
    v = voltage_kV * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_2d(params: CTFParams | dict[str, torch.Tensor], box: int, apix: float,
           device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """CTF on the centred 2-D Fourier grid, shape (B, box, box), RELION's sign and conventions."""
    p = params.to_torch(device) if isinstance(params, CTFParams) else {k: v.to(device, torch.float64)
                                                                        for k, v in params.items()}
    ky, kx = freq_grid_2d(box, apix, device=device, dtype=torch.float64)  # 1/Å
    u2 = (kx**2 + ky**2)[None]
    u4 = u2**2
    lam = electron_wavelength_A(p["voltage_kV"])[:, None, None]
    cs_A = (p["cs_mm"] * 1e7)[:, None, None]
    q0 = p["amp_contrast"][:, None, None]
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs_A * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1 - q0**2))
    k5 = torch.deg2rad(p["phase_shift_deg"])[:, None, None]
    # RELION stores defocus as negative underfocus: deltaf = -(avg + dev cos(2 (angle - azimuth)))
    avg = -(p["defocus_u_A"] + p["defocus_v_A"])[:, None, None] * 0.5
    dev = -(p["defocus_u_A"] - p["defocus_v_A"])[:, None, None] * 0.5
    azimuth = torch.deg2rad(p["defocus_angle_deg"])[:, None, None]
    ang = torch.atan2(ky, kx)[None]
    deltaf = avg + dev * torch.cos(2 * (ang - azimuth))
    argument = k1 * deltaf * u2 + k2 * u4 - k5 - k3
    ctf = -torch.sin(argument)
    bfac = p["bfactor_A2"][:, None, None]
    ctf = ctf * torch.exp(-bfac / 4 * u2) * p["scale"][:, None, None]
    return ctf.to(dtype)
