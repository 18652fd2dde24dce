"""Junk in a simulated particle set: images replaced by pure noise, another molecule or an off-centre particle.

``add_junk`` rewrites a fraction of the images that ``simulate_particles`` wrote (rows of one state), in place and
chunk by chunk, with the simulation's noise level and image scale, and records each particle's kind (0 a real
particle, then ``JUNK_KINDS`` from 1) in the STAR (``cryohetTrueJunk``) and in ``ground_truth.npz`` (``junk``).
The rows keep their recorded pose, origin and CTF, as a picker's junk would.
"""
from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryohet.atomic import atomic_path
from cryohet.geometry.ctf import CTFParams, ctf_2d
from cryohet.geometry.euler import euler_to_matrix
from cryohet.geometry.project import Projector
from cryohet.io.atomic_model import atom_coords, atom_weights
from cryohet.io.star import read_star, write_star
from cryohet.simulate.density import atoms_to_map

#: Junk kinds, coded 1, 2, 3 in ``cryohetTrueJunk`` / ``junk`` (0: a real particle).
JUNK_KINDS = ("noise", "other_molecule", "off_centre")
JUNK_COLUMN = "cryohetTrueJunk"


def other_molecule_map(structure, box: int, apix: float, resolution_A: float, device: str = "cpu") -> np.ndarray:
    """A different molecule of the same mass: the atoms of ``structure`` stretched 1.8× along x and squeezed
    0.75× across (an elongated rod instead of a globule), rendered like the particle's states."""
    xyz = atom_coords(structure)
    xyz = (xyz - xyz.mean(0)) * np.array([1.8, 0.75, 0.75])
    return atoms_to_map(xyz, box, apix, resolution_A, weights=atom_weights(structure), device=device)


def pick_junk(state: np.ndarray, from_state: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Junk kind per particle (0 none): ``fraction`` of all particles, drawn from the rows of ``from_state``,
    shared equally between the kinds."""
    n_junk = int(round(fraction * len(state)))
    pool = np.flatnonzero(state == from_state)
    if n_junk > len(pool):
        raise ValueError(f"{n_junk} junk images asked for but state {from_state} has {len(pool)} particles")
    rows = rng.choice(pool, n_junk, replace=False)
    kind = np.zeros(len(state), dtype=np.int64)
    kind[rows] = 1 + np.arange(n_junk) % len(JUNK_KINDS)
    return kind


def add_junk(out_dir: Path, state_map: np.ndarray, other_map: np.ndarray, kind: np.ndarray, seed: int,
             offset_px: float | None = None, device: str = "cpu", chunk: int = 256) -> None:
    """Replace the images of rows with ``kind`` > 0 in a simulation folder (``particles.mrcs``, ``particles.star``,
    ``ground_truth.npz``, as ``simulate_particles`` writes them) by junk of that kind.

    Pure noise: noise alone. Another molecule: ``other_map`` projected at the row's pose, CTF and origin. Off
    centre: ``state_map`` projected with the origin moved by ``offset_px`` pixels (default box / 4) in a random
    direction (the recorded origin is left as it was). Noise and scale are the simulation's.
    """
    truth_path, star_path, stack_path = out_dir / "ground_truth.npz", out_dir / "particles.star", \
        out_dir / "particles.mrcs"
    with np.load(truth_path) as gt:
        truth = dict(gt)
    box, apix = int(truth["box"]), float(truth["apix"])
    noise_sd = float(truth["noise_sigma"]) * float(truth["image_scale"])
    if not noise_sd > 0:
        raise ValueError("junk needs a noisy simulation (snr > 0)")
    offset = box / 4 if offset_px is None else float(offset_px)
    blocks = read_star(star_path)
    optics = blocks["optics"].iloc[0]
    rng = np.random.default_rng([seed, 0x7A4C])
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(2**62)))
    projectors = {2: Projector(torch.as_tensor(other_map, device=device)),
                  3: Projector(torch.as_tensor(state_map, device=device))}
    with mrcfile.mmap(stack_path, mode="r+") as mrc:
        for code in (1, 2, 3):
            rows = np.flatnonzero(kind == code)
            for s in range(0, len(rows), chunk):
                idx = rows[s:s + chunk]
                img = noise_sd * torch.randn((len(idx), box, box), generator=gen, device=device)
                if code in projectors:
                    shift = truth["shift_A"][idx] / apix
                    if code == 3:
                        angle = rng.uniform(0, 2 * math.pi, len(idx))
                        shift = shift + offset * np.stack([np.cos(angle), np.sin(angle)], 1)
                    ctf = CTFParams.broadcast(len(idx), defocus_u_A=truth["defocus_u_A"][idx],
                                              defocus_v_A=truth["defocus_v_A"][idx],
                                              defocus_angle_deg=truth["defocus_angle_deg"][idx],
                                              voltage_kV=float(optics["rlnVoltage"]),
                                              cs_mm=float(optics["rlnSphericalAberration"]),
                                              amp_contrast=float(optics["rlnAmplitudeContrast"]))
                    A = torch.as_tensor(euler_to_matrix(truth["euler_deg"][idx]), dtype=torch.float32, device=device)
                    img += float(truth["image_scale"]) * projectors[code].project(
                        A, torch.as_tensor(shift, dtype=torch.float32, device=device),
                        ctf_2d(ctf, box, apix, device=device))
                mrc.data[idx] = img.cpu().numpy()
        mrc.update_header_stats()
        mrc.flush()
    blocks["particles"][JUNK_COLUMN] = kind
    write_star(star_path, blocks)
    with atomic_path(truth_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **truth, junk=kind, junk_kinds=np.array(JUNK_KINDS))
