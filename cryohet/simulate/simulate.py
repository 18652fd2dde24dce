"""Particle images with ground truth from a family of maps: poses, shifts, CTF, noise at a chosen SNR.

Per particle: a state k (uniform, or ``populations``), a pose uniform on SO(3) (or, for a fraction of the particles,
near the top view: a preferred orientation), a Gaussian origin, a defocus in
the given range with a little astigmatism, the CTF-modulated Fourier-slice projection of map k moved by the
origin (``Projector.project``, RELION's conventions), then Gaussian white noise. SNR is the variance of the
noise-free images inside the particle's circle (radius from the maps) over the noise variance, measured over
the whole data set. With ``normalise`` the images are divided by the noise standard deviation, so the noise has
unit variance (as RELION-normalised particles) and the signal variance is the SNR.

Images are streamed into a memory-mapped MRCS (written once, then noised in place chunk by chunk), so memory
does not grow with the number of particles.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryohet.atomic import atomic_path
from cryohet.geometry.ctf import CTFParams, ctf_2d
from cryohet.geometry.euler import euler_to_matrix, random_euler
from cryohet.geometry.project import Projector
from cryohet.io.mrc import write_map
from cryohet.simulate.density import particle_radius_A
from cryohet.simulate.motions import Conformations
from cryohet.simulate.views import tilt_to_top_view

ProgressFn = Callable[[Iterable[Any], str, int], Iterator[Any]]
STAR_NAME, STACK_NAME, TRUTH_NAME, MAPS_DIR = "particles.star", "particles.mrcs", "ground_truth.npz", "maps"


@dataclass
class SimulationOutput:
    """Paths of what ``simulate_particles`` wrote, and the noise level it used."""

    out_dir: Path
    particles_star: Path
    particles_mrcs: Path
    ground_truth: Path
    map_paths: list[Path]
    mean_map: Path | None
    n_particles: int
    noise_sigma: float          # noise standard deviation in map-projection units (0 without noise)
    signal_var: float           # mean per-image signal variance inside the particle circle (projection units)
    image_scale: float          # images = image_scale * (projection + noise)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParticleDraws:
    """Per-particle random choices (rows = particles, STAR order)."""

    state: np.ndarray               # (N,) int64
    euler_deg: np.ndarray           # (N, 3) rot, tilt, psi
    shift_A: np.ndarray             # (N, 2) rlnOriginXAngst, rlnOriginYAngst
    defocus_u_A: np.ndarray         # (N,)
    defocus_v_A: np.ndarray         # (N,)
    defocus_angle_deg: np.ndarray   # (N,)
    random_subset: np.ndarray       # (N,) 1 or 2, balanced


def draw_particles(n: int, n_states: int, rng: np.random.Generator, populations: np.ndarray | None = None,
                   defocus_range_A: tuple[float, float] = (10000.0, 25000.0), astigmatism_A: float = 500.0,
                   shift_sigma_A: float = 2.0, shift_max_A: float | None = None,
                   defocus_lognormal: bool = False, top_view_fraction: float = 0.0) -> ParticleDraws:
    """Draw states, uniform poses, origins (Gaussian of ``shift_sigma_A``, or with ``shift_max_A`` uniform in
    ±shift_max_A on each axis), defocus (mean uniform in the range, or with ``defocus_lognormal`` log-normal with
    the range as its ±2σ, clipped to it, as experimental defocus spreads; uniform astigmatism and angle).
    ``top_view_fraction``: that fraction of the particles (drawn at random) is tilted only |N(0, ``TOP_VIEW_SD_DEG``)|
    from the top view (particles lying flat on the grid); the other draws are the same as without it."""
    if not 0.0 <= top_view_fraction <= 1.0:
        raise ValueError(f"top_view_fraction must be in [0, 1], got {top_view_fraction}")
    p = None
    if populations is not None:
        p = np.asarray(populations, dtype=np.float64)
        if p.shape != (n_states,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"populations must be {n_states} non-negative weights, got {p}")
        p = p / p.sum()
    state = rng.choice(n_states, size=n, p=p).astype(np.int64)
    euler = random_euler(n, rng)
    if shift_max_A is not None:
        shift = rng.uniform(-shift_max_A, shift_max_A, size=(n, 2))
    else:
        shift = rng.normal(0.0, shift_sigma_A, size=(n, 2)) if shift_sigma_A > 0 else np.zeros((n, 2))
    lo, hi = sorted(defocus_range_A)
    if defocus_lognormal and lo > 0:
        log_mid, log_sd = (np.log(lo) + np.log(hi)) / 2, (np.log(hi) - np.log(lo)) / 4
        mean = np.clip(np.exp(rng.normal(log_mid, log_sd, n)), lo, hi)
    else:
        mean = rng.uniform(lo, hi, n)
    astig = rng.uniform(0.0, astigmatism_A, n)
    angle = rng.uniform(0.0, 180.0, n)
    subset = np.where(rng.permutation(n) % 2 == 0, 1, 2).astype(np.int64)
    if top_view_fraction > 0:  # drawn last, so that every other draw is the same as without preferred views
        tilt_to_top_view(euler, top_view_fraction, rng)
    return ParticleDraws(state, np.asarray(euler, dtype=np.float64), shift, mean + astig / 2, mean - astig / 2,
                         angle, subset)


def _plain_progress(items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    yield from items


def _image_name_base(stack: Path, star_dir: Path, image_paths: str) -> str:
    if image_paths == "star":
        return os.path.relpath(stack, star_dir)
    if image_paths == "cwd":
        return os.path.relpath(stack, Path.cwd())
    if image_paths == "absolute":
        return str(stack.resolve())
    raise ValueError(f"image_paths must be star, cwd or absolute, got {image_paths!r}")


def _write_star(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    from cryohet.io.star import write_star

    write_star(path, {"optics": optics, "particles": particles})


def simulate_particles(conf: Conformations, out_dir: str | os.PathLike, n_particles: int, snr: float | None,
                       populations: np.ndarray | None = None,
                       defocus_range_A: tuple[float, float] = (10000.0, 25000.0), shift_sigma_A: float = 2.0,
                       voltage_kV: float = 300.0, cs_mm: float = 2.7, amp_contrast: float = 0.1, seed: int = 0,
                       device: torch.device | str = "cpu", progress: ProgressFn | None = None, *,
                       astigmatism_A: float = 500.0, normalise: bool = True, chunk_size: int = 256,
                       image_paths: str = "star", write_maps: bool = True, shift_max_A: float | None = None,
                       defocus_lognormal: bool = False, top_view_fraction: float = 0.0) -> SimulationOutput:
    """Simulate ``n_particles`` images of ``conf`` into ``out_dir`` with their ground truth.

    ``snr``: signal variance inside the particle / noise variance; None (or inf) for noise-free images.
    Writes ``particles.star`` (RELION 3.1, ground truth in ``cryohetTrueState`` and ``cryohetTrueTau1..d``),
    ``particles.mrcs``, ``ground_truth.npz`` (rows = STAR rows) and, with ``write_maps``, ``maps/state_XXX.mrc``
    and ``maps/mean.mrc`` (population-weighted mean of the states actually drawn). ``image_paths``: how
    rlnImageName names the stack: relative to the STAR file's folder (``star``), to the current folder (``cwd``,
    RELION's project-folder convention) or ``absolute``. ``shift_max_A``, ``defocus_lognormal``,
    ``top_view_fraction``: see ``draw_particles``. Same seed => same draws and noise whatever ``snr``.
    """
    if n_particles < 1:
        raise ValueError("n_particles must be at least 1")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive (or None for no noise), got {snr}")
    noisy = snr is not None and math.isfinite(snr)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    progress = progress or _plain_progress
    box, apix, k_states = conf.box, float(conf.apix), conf.n_states
    rng = np.random.default_rng([seed, 7001])
    d = draw_particles(n_particles, k_states, rng, populations, defocus_range_A, astigmatism_A, shift_sigma_A,
                       shift_max_A, defocus_lognormal, top_view_fraction)
    ctf_all = CTFParams.broadcast(n_particles, defocus_u_A=d.defocus_u_A, defocus_v_A=d.defocus_v_A,
                                  defocus_angle_deg=d.defocus_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                                  amp_contrast=amp_contrast)
    radius_A = min(particle_radius_A(conf.maps, apix), (box // 2 - 1) * apix)
    yy, xx = np.indices((box, box)) - box // 2
    inside = torch.as_tensor(np.hypot(xx, yy) <= radius_A / apix, device=device)

    stack_path, star_path = out_dir / STACK_NAME, out_dir / STAR_NAME
    jobs = [(k, idx[s:s + chunk_size]) for k in range(k_states)
            for idx in [np.flatnonzero(d.state == k)] for s in range(0, len(idx), chunk_size)]
    with atomic_path(stack_path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n_particles, box, box), mrc_mode=2, overwrite=True) as mrc:
            stack = mrc.data
            sig_sum, projector, proj_state = 0.0, None, -1
            # pass 1: noise-free images, state by state (one padded map transform in memory at a time)
            for k, idx in progress(jobs, "projecting", len(jobs)):
                if k != proj_state:
                    projector = Projector(torch.as_tensor(conf.maps[k], device=device))
                    proj_state = k
                A = torch.as_tensor(euler_to_matrix(d.euler_deg[idx]), dtype=torch.float32, device=device)
                shift_px = torch.as_tensor(d.shift_A[idx] / apix, dtype=torch.float32, device=device)
                ctf = ctf_2d(ctf_all.take(idx), box, apix, device=device)
                img = projector.project(A, shift_px, ctf)
                vals = img[:, inside]
                sig_sum += float(vals.var(dim=1, unbiased=False).sum())
                stack[idx] = img.cpu().numpy()  # idx is sorted
            projector = None
            signal_var = sig_sum / n_particles
            sigma = math.sqrt(signal_var / snr) if noisy else 0.0
            scale = 1.0 / sigma if (noisy and normalise and sigma > 0) else 1.0
            # pass 2: noise, in STAR order, and the header statistics
            gen = torch.Generator(device=device)
            gen.manual_seed(int(np.random.default_rng([seed, 7002]).integers(2**62)))
            dmin, dmax, s1, s2 = math.inf, -math.inf, 0.0, 0.0
            chunks = range(0, n_particles, chunk_size)
            for s in progress(chunks, "noise", len(chunks)) if noisy else chunks:
                e = min(s + chunk_size, n_particles)
                img = torch.as_tensor(np.array(stack[s:e]), device=device)
                if noisy:
                    noise = torch.randn(img.shape, generator=gen, device=device, dtype=torch.float32)
                    img = (img + sigma * noise) * scale
                    stack[s:e] = img.cpu().numpy()
                x = img.double()
                dmin, dmax = min(dmin, float(x.min())), max(dmax, float(x.max()))
                s1, s2 = s1 + float(x.sum()), s2 + float((x * x).sum())
            mrc.set_image_stack()
            mrc.voxel_size = apix
            count = n_particles * box * box
            mean = s1 / count
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = dmin, dmax, mean
            mrc.header.rms = math.sqrt(max(s2 / count - mean**2, 0.0))
            mrc.flush()

    # STAR (RELION 3.1) with the ground truth columns
    name = _image_name_base(stack_path, star_path.parent, image_paths)
    tau = conf.tau[d.state]
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2],
                           "rlnVoltage": [float(voltage_kV)], "rlnSphericalAberration": [float(cs_mm)],
                           "rlnAmplitudeContrast": [float(amp_contrast)]})
    cols: dict[str, Any] = {
        "rlnImageName": [f"{i + 1:06d}@{name}" for i in range(n_particles)],
        "rlnAngleRot": d.euler_deg[:, 0], "rlnAngleTilt": d.euler_deg[:, 1], "rlnAnglePsi": d.euler_deg[:, 2],
        "rlnOriginXAngst": d.shift_A[:, 0], "rlnOriginYAngst": d.shift_A[:, 1],
        "rlnDefocusU": d.defocus_u_A, "rlnDefocusV": d.defocus_v_A, "rlnDefocusAngle": d.defocus_angle_deg,
        "rlnOpticsGroup": np.ones(n_particles, dtype=np.int64), "rlnRandomSubset": d.random_subset,
        "cryohetTrueState": d.state}
    for j in range(conf.dim):
        cols[f"cryohetTrueTau{j + 1}"] = tau[:, j]
    _write_star(star_path, optics, pd.DataFrame(cols))

    # maps of the states and their population-weighted mean
    map_paths: list[Path] = []
    mean_path = None
    counts = np.bincount(d.state, minlength=k_states)
    if write_maps:
        (out_dir / MAPS_DIR).mkdir(exist_ok=True)
        for k in range(k_states):
            p = out_dir / MAPS_DIR / f"state_{k:03d}.mrc"
            write_map(p, conf.maps[k], apix)
            map_paths.append(p)
        mean_path = out_dir / MAPS_DIR / "mean.mrc"
        write_map(mean_path, np.tensordot(counts / counts.sum(), conf.maps, axes=1), apix)

    truth_path = out_dir / TRUTH_NAME
    with atomic_path(truth_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, state=d.state, tau=tau, euler_deg=d.euler_deg, shift_A=d.shift_A,
                 defocus_u_A=d.defocus_u_A, defocus_v_A=d.defocus_v_A, defocus_angle_deg=d.defocus_angle_deg,
                 random_subset=d.random_subset, conf_tau=conf.tau, conf_kind=np.array(conf.kind),
                 populations=counts / counts.sum(), apix=apix, box=box, snr=np.nan if snr is None else snr,
                 noise_sigma=sigma, signal_var=signal_var, image_scale=scale, particle_radius_A=radius_A,
                 map_files=np.array([p.name for p in map_paths]))
    return SimulationOutput(out_dir, star_path, stack_path, truth_path, map_paths, mean_path, n_particles, sigma,
                            signal_var, scale, meta=dict(particle_radius_A=radius_A, counts=counts.tolist()))
