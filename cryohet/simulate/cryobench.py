"""CryoBench-class families of maps (Jeon et al. 2024), built from copies of the bundled adenylate kinase (AdK,
open 4AKE / closed 1AKE heavy atoms) since CryoBench's own atomic models cannot be downloaded here.

- ``igg_1d``: an IgG-like Y of three AdK copies (an "Fc" and two "Fabs" about a hinge point); one Fab turns about
  a fixed axis through the hinge (a dihedral) in K steps over 360°. τ = (cos, sin) of the angle (a circle).
- ``igg_rl``: the same Y; the Fab takes K random orientations about the hinge (a flexible linker: random axis,
  angle up to ``max_angle_deg``). τ = the rotation vector (rad, 3-D).
- ``ribosembly``: an assembly of ten AdK copies packed about a centre; K assembly intermediates, each a core of
  four copies plus the subunits added so far along one of three assembly orders. Discrete; uneven populations
  come from ``ribosembly_populations``.
- ``tomotwin``: K different complexes of one to four rigid subunits (AdK open/closed/between, or a pseudo-atomic
  globule), randomly oriented and packed, each centred on its own centre of mass. Discrete.
- ``spike_md``: frames of an MD-like trajectory of an AdK trimer: each protomer's LID/NMP closing (open -> closed
  interpolation) follows its own Ornstein–Uhlenbeck process in time, plus smooth thermal displacements of all
  atoms. τ = the three protomers' closing fractions; the frames are kept (``meta['frames_A']``) so that they can
  be written as a trajectory (``write_frames``: topology PDB and DCD through MDAnalysis).

Every builder is deterministic given ``seed`` and returns a ``Conformations`` (maps on one grid).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from cryohet.atomic import atomic_path
from cryohet.io.atomic_model import Atoms, box_centre_A, write_models
from cryohet.simulate.density import atoms_to_map
from cryohet.simulate.ensemble import transition_frames, write_trajectory
from cryohet.simulate.molecules import centre_of_mass
from cryohet.simulate.motions import Conformations, _maps_of_models, rotate_about_axis

#: Centres (Å) of the IgG-like Y's parts about the hinge point (the origin): Fc below, the two Fabs above.
IGG_CENTRES_A = {"fc": np.array([0.0, -48.0, 0.0]), "fab1": np.array([-36.0, 30.0, 0.0]),
                 "fab2": np.array([36.0, 30.0, 0.0])}
#: Axis of IgG-1D's dihedral (through the hinge), about 40° from the hinge -> Fab2 line: the Fab sweeps a cone.
IGG_1D_AXIS = np.array([1.0, 0.0, 0.0])
SUBUNIT_SPACING_A = 46.0


def adk_models() -> tuple[Atoms, np.ndarray, np.ndarray]:
    """AdK heavy atoms and their open and closed coordinates (N, 3) Å, both centred on the open centre of mass
    (closed superposed on open by the atoms that move least)."""
    atoms, frames = transition_frames(2, 2, 1.0)
    c = centre_of_mass(frames[0], atoms.weight)
    return atoms, frames[0] - c, frames[1] - c


def _copy(xyz: np.ndarray, rotation: Rotation, centre_A: np.ndarray) -> np.ndarray:
    """``xyz`` (centred) rotated then moved to ``centre_A``."""
    return rotation.apply(xyz) + centre_A


def _igg_parts(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(static coordinates of Fc + Fab1, Fab2 at rest, weights of the static part, weights of Fab2)."""
    atoms, xo, _ = adk_models()
    rots = Rotation.random(3, random_state=np.random.default_rng([seed, 11]).integers(2**31))
    parts = {name: _copy(xo, rots[i], c) for i, (name, c) in enumerate(IGG_CENTRES_A.items())}
    static = np.concatenate([parts["fc"], parts["fab1"]])
    return static, parts["fab2"], np.tile(atoms.weight, 2), atoms.weight


def _maps_static_plus_moving(static: np.ndarray, w_static: np.ndarray, moving: list[np.ndarray],
                             w_moving: np.ndarray, box: int, apix: float, resolution_A: float, device: str
                             ) -> np.ndarray:
    models = [np.concatenate([static, m]) for m in moving]
    return _maps_of_models(models, np.concatenate([w_static, w_moving]), box, apix, resolution_A, device)


def igg_1d(n_states: int, box: int, apix: float, resolution_A: float, seed: int = 0, device: str = "cpu"
           ) -> Conformations:
    """IgG-1D analogue: one Fab turned about a dihedral axis through the hinge, K angles evenly over 360°."""
    static, fab, ws, wf = _igg_parts(seed)
    angles = 360.0 * np.arange(n_states) / n_states
    moving = [rotate_about_axis(fab, np.zeros(3), IGG_1D_AXIS, a) for a in angles]
    maps = _maps_static_plus_moving(static, ws, moving, wf, box, apix, resolution_A, device)
    rad = np.deg2rad(angles)
    return Conformations(maps, np.stack([np.cos(rad), np.sin(rad)], axis=1), apix, "continuous",
                         meta=dict(motion="igg_1d", angle_deg=angles.tolist(), resolution_A=resolution_A))


def igg_rl(n_states: int, box: int, apix: float, resolution_A: float, seed: int = 0, device: str = "cpu",
           max_angle_deg: float = 60.0) -> Conformations:
    """IgG-RL analogue: the Fab in K random orientations about the hinge (axis uniform on the sphere, angle
    uniform in [0, ``max_angle_deg``])."""
    static, fab, ws, wf = _igg_parts(seed)
    rng = np.random.default_rng([seed, 12])
    axes = rng.normal(size=(n_states, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    rotvec = axes * np.deg2rad(rng.uniform(0.0, max_angle_deg, n_states))[:, None]
    moving = [Rotation.from_rotvec(r).apply(fab) for r in rotvec]
    maps = _maps_static_plus_moving(static, ws, moving, wf, box, apix, resolution_A, device)
    return Conformations(maps, rotvec, apix, "continuous",
                         meta=dict(motion="igg_rl", max_angle_deg=max_angle_deg, resolution_A=resolution_A))


def packed_centres(n: int, spacing_A: float = SUBUNIT_SPACING_A) -> np.ndarray:
    """``n`` points of a face-centred cubic lattice of nearest-neighbour distance ``spacing_A`` nearest their
    common centre (n, 3) Å: a compact cluster of subunits that do not overlap."""
    r = np.arange(-3, 4)
    g = np.array(np.meshgrid(r, r, r, indexing="ij")).reshape(3, -1).T
    fcc = g[g.sum(axis=1) % 2 == 0] * spacing_A / np.sqrt(2.0)
    order = np.lexsort((fcc[:, 2], fcc[:, 1], fcc[:, 0], np.round(np.linalg.norm(fcc, axis=1), 6)))
    pts = fcc[order[:n]]
    return pts - pts.mean(axis=0)


def assembly_states(n_states: int, n_core: int = 4, n_extra: int = 6, seed: int = 0) -> list[list[int]]:
    """Subunit sets of ``n_states`` distinct assembly intermediates: the core (0 … n_core−1) plus the first m
    extra subunits in one of three assembly orders, m = 0 … n_extra, distinct sets in order of size."""
    rng = np.random.default_rng([seed, 13])
    extra = np.arange(n_core, n_core + n_extra)
    orders = [extra, extra[::-1], rng.permutation(extra)]
    sets: list[tuple[int, ...]] = []
    for m in range(n_extra + 1):
        for order in orders:
            s = tuple(sorted(range(n_core)) + sorted(order[:m].tolist()))
            if s not in sets:
                sets.append(s)
    if n_states > len(sets):
        raise ValueError(f"at most {len(sets)} assembly states with {n_core} core and {n_extra} extra subunits")
    pick = np.unique(np.round(np.linspace(0, len(sets) - 1, n_states)).astype(int))
    return [list(sets[i]) for i in pick]


def ribosembly_populations(n_states: int, seed: int = 0) -> np.ndarray:
    """Uneven populations (K,), summing to 1: Dirichlet(0.7) draws with a floor of 0.2/K (as in CryoBench's
    Ribosembly, where some states hold a few per cent of the particles and others several times the mean)."""
    p = np.random.default_rng([seed, 14]).dirichlet(np.full(n_states, 0.7))
    p = np.maximum(p, 0.2 / n_states)
    return p / p.sum()


def ribosembly(n_states: int, box: int, apix: float, resolution_A: float, seed: int = 0, device: str = "cpu"
               ) -> Conformations:
    """Ribosembly analogue: K assembly intermediates of ten packed AdK copies (see ``assembly_states``)."""
    atoms, xo, _ = adk_models()
    n_sub = 10
    centres = packed_centres(n_sub)
    rots = Rotation.random(n_sub, random_state=np.random.default_rng([seed, 15]).integers(2**31))
    centre = box_centre_A(box, apix)
    sub_maps = np.stack([atoms_to_map(_copy(xo, rots[i], centres[i]) + centre, box, apix, resolution_A,
                                      centre_A=centre, weights=atoms.weight, device=device) for i in range(n_sub)])
    sets = assembly_states(n_states, seed=seed)
    maps = np.stack([sub_maps[s].sum(axis=0) for s in sets])
    return Conformations(maps, np.arange(len(sets), dtype=np.float64), apix, "discrete",
                         meta=dict(motion="ribosembly", subunits=sets, resolution_A=resolution_A))


def pseudo_globule(rng: np.random.Generator, density_per_A3: float = 1 / 12.0) -> np.ndarray:
    """A pseudo-atomic globule (M, 3) Å centred at 0: points uniform in an ellipsoid of random semi-axes
    12–26 Å, at about the heavy-atom density of a protein."""
    semi = rng.uniform(12.0, 26.0, 3)
    n = int(4.0 / 3.0 * np.pi * semi.prod() * density_per_A3)
    u = rng.normal(size=(n, 3))
    u *= (rng.uniform(size=n) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
    return u * semi


def tomotwin(n_states: int, box: int, apix: float, resolution_A: float, seed: int = 0, device: str = "cpu"
             ) -> Conformations:
    """Tomotwin-100 analogue: K distinct complexes of 1–4 subunits each (AdK at a random point of its open ->
    closed path, or a pseudo-atomic globule of carbon-like atoms), randomly oriented on packed positions."""
    atoms, xo, xc = adk_models()
    rng = np.random.default_rng([seed, 16])
    maps, parts = [], []
    for _ in range(n_states):
        n_sub = int(rng.integers(1, 5))
        pos = packed_centres(4)[rng.permutation(4)[:n_sub]]
        xyz, w, kinds = [], [], []
        for c in pos:
            if rng.uniform() < 0.7:
                t = rng.uniform()
                sub, ws, kinds = (1 - t) * xo + t * xc, atoms.weight, kinds + [f"adk:{t:.2f}"]
            else:
                sub = pseudo_globule(rng)
                ws, kinds = np.full(len(sub), 6.0), kinds + ["globule"]
            xyz.append(_copy(sub, Rotation.random(random_state=rng.integers(2**31)), c))
            w.append(ws)
        xyz_all, w_all = np.concatenate(xyz), np.concatenate(w)
        maps.append(atoms_to_map(xyz_all, box, apix, resolution_A, weights=w_all, device=device))
        parts.append(kinds)
    return Conformations(np.stack(maps), np.arange(n_states, dtype=np.float64), apix, "discrete",
                         meta=dict(motion="tomotwin", subunits=parts, resolution_A=resolution_A))


def ou_process(n_steps: int, n_series: int, corr_steps: float, rng: np.random.Generator) -> np.ndarray:
    """(n_steps, n_series) stationary Ornstein–Uhlenbeck series of unit variance and correlation time
    ``corr_steps`` steps."""
    a = np.exp(-1.0 / corr_steps)
    x = np.empty((n_steps, n_series))
    x[0] = rng.normal(size=n_series)
    for t in range(1, n_steps):
        x[t] = a * x[t - 1] + np.sqrt(1 - a * a) * rng.normal(size=n_series)
    return x


def spike_md(n_states: int, box: int, apix: float, resolution_A: float, seed: int = 0, device: str = "cpu",
             thermal_A: float = 0.8) -> Conformations:
    """Spike-MD analogue: K frames of a trimer whose protomers close and open independently (OU processes of
    correlation time K/6 frames through a logistic), with smooth thermal displacements of RMS ``thermal_A``."""
    atoms, xo, xc = adk_models()
    rng = np.random.default_rng([seed, 17])
    closing = 1.0 / (1.0 + np.exp(-2.0 * ou_process(n_states, 3, max(n_states / 6.0, 1.0), rng)))
    rot = [Rotation.from_euler("z", 120.0 * p, degrees=True) * Rotation.from_euler("x", 20.0, degrees=True)
           for p in range(3)]
    offset = np.array([30.0, 0.0, 0.0])
    n_waves = 4
    waves_k = rng.normal(size=(n_waves, 3)) / 25.0          # 1/Å: wavelengths of about 150 Å
    waves_dir = rng.normal(size=(n_waves, 3))
    waves_phase = rng.uniform(0, 2 * np.pi, n_waves)
    wave_amp = ou_process(n_states, n_waves, max(n_states / 20.0, 1.0), rng) * thermal_A / np.sqrt(n_waves / 2)
    frames = []
    for f in range(n_states):
        prot = [rot[p].apply((1 - closing[f, p]) * xo + closing[f, p] * xc + offset) for p in range(3)]
        x = np.concatenate(prot)
        x = x + (wave_amp[f] * np.sin(x @ waves_k.T + waves_phase)) @ waves_dir / np.sqrt(3)
        frames.append(x)
    frames_arr = np.stack(frames)
    weights = np.tile(atoms.weight, 3)
    frames_arr += box_centre_A(box, apix) - np.mean([centre_of_mass(x, weights) for x in frames_arr], axis=0)
    centre = box_centre_A(box, apix)
    maps = np.stack([atoms_to_map(x, box, apix, resolution_A, centre_A=centre, weights=weights, device=device)
                     for x in frames_arr])
    trimer = dataclasses.replace(
        atoms, xyz_A=frames_arr[0], weight=weights,
        chain=np.concatenate([np.full(len(atoms), c) for c in "ABC"]),
        **{f: np.tile(getattr(atoms, f), 3) for f in ("resseq", "resname", "name", "element", "b_factor", "icode")})
    return Conformations(maps, closing, apix, "continuous",
                         meta=dict(motion="spike_md", resolution_A=resolution_A, thermal_A=thermal_A,
                                   frames_A=frames_arr, atoms=trimer))


def write_frames(out_dir: Path, conf: Conformations) -> list[Path]:
    """Write a spike_md family's frames: ``topology.pdb`` (frame 1, map frame) and ``frames.dcd`` (MDAnalysis);
    nothing for other families."""
    if "frames_A" not in conf.meta:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    top, dcd = out_dir / "topology.pdb", out_dir / "frames.dcd"
    write_models(top, conf.meta["atoms"], conf.meta["frames_A"][0])
    with atomic_path(dcd) as tmp:
        write_trajectory(tmp, top, conf.meta["frames_A"])
    return [top, dcd]


#: name -> builder(n_states, box, apix, resolution_A, seed, device)
BUILDERS = {"igg-1d": igg_1d, "igg-rl": igg_rl, "ribosembly": ribosembly, "tomotwin": tomotwin,
            "spike-md": spike_md}
