"""CryoBench-style benchmark datasets: simulated particles of a known motion, with the true maps and the
true conformation of every particle.

A dataset folder holds what the simulator writes (``particles.star`` + ``particles.mrcs``,
``ground_truth.npz``, ``maps/state_XXX.mrc``) and ``benchmark.json``: the dataset's name, kind
(continuous / discrete), the coordinates τ of its K true maps, their populations, box, Å/pixel and SNR.
Scoring (cryohet.validation.score) needs nothing else.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.errors import InputError
from cryohet.models.maps import MapsModel

if TYPE_CHECKING:
    from cryohet.simulate.motions import Conformations

BENCHMARK_FILE = "benchmark.json"
BENCHMARK_FORMAT = "cryohet-benchmark-1"

#: The datasets benchmark-make builds, all from the bundled adenylate kinase (open 4AKE / closed 1AKE).
DATASETS: dict[str, str] = {
    "hinge": "continuous 1-D motion: the LID domain rotating about its hinge (τ = fraction of the closing angle)",
    "interpolation": "continuous 1-D motion: linear interpolation of all atoms from the open (4AKE) to the closed "
                     "(1AKE) model",
    "two-part": "continuous 2-D motion: the LID (τ1) and NMP (τ2) domains closing independently",
    "discrete": "discrete states with uneven populations: open, LID closed, NMP closed, both closed",
    "junk": "outliers: the open model with a 2 % rare state (the closed model, 1AKE) and 10 % junk (pure noise, "
            "another molecule, off-centre particles; truth in cryohetTrueJunk)",
}
#: The datasets of a motion ("benchmark-make --dataset all").
MOTION_DATASETS = ("hinge", "interpolation", "two-part", "discrete")
#: The junk dataset's fractions of all particles: junk images (shared equally by the junk kinds), rare state.
JUNK_FRACTION, RARE_FRACTION = 0.10, 0.02

#: CryoBench's five datasets, as analogues built from AdK copies (cryohet.simulate.cryobench).
CRYOBENCH: dict[str, str] = {
    "igg-1d": "IgG-1D analogue: a Y of three AdK copies, one arm turning about a dihedral axis over 360° "
              "(τ = cos, sin of the angle)",
    "igg-rl": "IgG-RL analogue: the same Y, the arm in random orientations about a flexible linker (τ = rotation "
              "vector, rad)",
    "ribosembly": "Ribosembly analogue: assembly intermediates of ten packed AdK copies (a core of four plus "
                  "subunits added along three orders), uneven populations",
    "tomotwin": "Tomotwin-100 analogue: different complexes of 1-4 subunits (AdK or pseudo-atomic globules)",
    "spike-md": "Spike-MD analogue: frames of an MD-like trajectory of an AdK trimer (each protomer closing on its "
                "own clock, plus thermal motion; τ = the three closing fractions; frames in trajectory/)",
}
DATASETS.update(CRYOBENCH)

#: Default number of true maps (K) per dataset; for two-part it is the grid size per axis (K = n²).
DEFAULT_STATES = {"hinge": 20, "interpolation": 20, "two-part": 5, "discrete": 4, "junk": 2, "igg-1d": 100,
                  "igg-rl": 100, "ribosembly": 16, "tomotwin": 100, "spike-md": 100}


@dataclass(frozen=True)
class ImageSettings:
    """Image settings of a size preset: box, Å/pixel, particles, SNR, origins uniform in ±shift_max_px, defocus
    log-normal in the range (Å) with astigmatism up to ``astigmatism_A``."""

    box: int
    apix: float
    n_particles: int
    snr: float
    shift_max_px: float
    defocus_range_A: tuple[float, float] = (5000.0, 30000.0)
    astigmatism_A: float = 1000.0


#: CryoBench's image settings (full: box 128 at 3 Å/px, SNR 0.01, ±20 px shifts) and a CPU-sized variant with the
#: same field of view and shifts in Å (box 64 at 6 Å/px, ±10 px).
SIZES = {"full": ImageSettings(128, 3.0, 100_000, 0.01, 20.0),
         "cpu": ImageSettings(64, 6.0, 3000, 0.01, 10.0)}


@dataclass
class BenchmarkDataset:
    """A benchmark folder read back: per-particle truth and the K true maps."""

    root: Path
    name: str
    kind: str                   # "continuous" | "discrete"
    state: np.ndarray           # (N,) int: index of each particle's true map
    tau: np.ndarray             # (N, d) float64: true conformation coordinate of each particle
    state_tau: np.ndarray       # (K, d) float64: coordinate of each true map
    populations: np.ndarray     # (K,) fraction of the particles in each state (as drawn; sums to 1)
    map_paths: list[Path]       # K MRC files
    box: int
    apix: float                 # Å/pixel
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        return len(self.state)

    @property
    def n_states(self) -> int:
        return len(self.map_paths)

    @property
    def latent_dim(self) -> int:
        """Dimension of the true conformation coordinate τ."""
        return int(self.state_tau.shape[1])

    @property
    def particles_star(self) -> Path:
        return self.root / "particles.star"

    def true_model(self) -> MapsModel:
        """The true maps as a VolumeModel over τ (the map at τ is that of the nearest true state)."""
        return MapsModel(self.map_paths, self.state_tau, self.apix)

    def true_latents(self) -> np.ndarray:
        """The known-good answer: each particle's true τ (N, d)."""
        return self.tau.copy()


def default_apix(box: int, name: str = "hinge") -> float:
    """Å/pixel that keeps a 128 Å field of view for one AdK (about 60 Å across), CryoBench's 384 Å for its
    analogues (assemblies up to about 160 Å across, shifted by up to 60 Å)."""
    return (384.0 if name in CRYOBENCH else 128.0) / box


def default_populations(name: str, n_states: int) -> np.ndarray:
    """Uniform for continuous motions; for discrete states ∝ K, K−1, …, 1 (0.4/0.3/0.2/0.1 for K = 4); for junk
    the rare state (the last) holds ``RARE_FRACTION``."""
    if name == "junk":
        return np.array([1 - RARE_FRACTION, RARE_FRACTION])
    if name == "discrete":
        p = np.arange(n_states, 0, -1, dtype=np.float64)
    elif name == "ribosembly":
        from cryohet.simulate.cryobench import ribosembly_populations

        p = ribosembly_populations(n_states)
    else:
        p = np.ones(n_states)
    return p / p.sum()


def build_conformations(name: str, box: int, apix: float, n_states: int | None = None,
                        resolution_A: float | None = None, device: str = "cpu", seed: int = 0) -> Conformations:
    """The true maps of a benchmark dataset (a cryohet.simulate Conformations); ``seed`` fixes the random
    geometry of the CryoBench analogues."""
    from cryohet.simulate.molecules import default_molecule
    from cryohet.simulate.motions import (
        discrete_conformations,
        hinge_conformations,
        interpolation_conformations,
        two_part_conformations,
    )

    if name not in DATASETS:
        raise ValueError(f"unknown benchmark dataset {name!r}; known: {', '.join(DATASETS)}")
    n = int(n_states or DEFAULT_STATES[name])
    res = float(resolution_A or max(6.0, 2.5 * apix))
    kw = dict(box=box, apix=apix, resolution_A=res, device=device)
    if name in CRYOBENCH:
        from cryohet.simulate.cryobench import BUILDERS

        return BUILDERS[name](n, seed=seed, **kw)
    mol = default_molecule()
    if name == "hinge":
        return hinge_conformations(mol, n_states=n, **kw)
    if name == "interpolation":
        return interpolation_conformations(mol, default_molecule(closed=True), n_states=n, **kw)
    if name == "two-part":
        return two_part_conformations(mol, n_per_axis=n, **kw)
    if name == "junk":
        conf = discrete_conformations([mol, default_molecule(closed=True)], apix=apix, box=box, resolution_A=res,
                                      device=device)
        conf.meta.update(source="open (common) and closed (rare) models", resolution_A=res)
        return conf
    if n < 2:
        raise ValueError("a discrete dataset needs at least 2 states")
    per_axis = max(2, math.ceil(math.sqrt(n)))
    grid = two_part_conformations(mol, n_per_axis=per_axis, **kw)
    if n == 4 and per_axis == 2:
        pick = np.arange(4)
    else:
        pick = np.unique(np.round(np.linspace(0, grid.n_states - 1, n)).astype(int))
    conf = discrete_conformations(list(grid.maps[pick]), apix=apix)
    conf.meta.update(source="two_part corners" if n == 4 else "two_part grid",
                     two_part_tau=grid.tau[pick].tolist(), resolution_A=res)
    return conf


def make_dataset(name: str, out_dir: str | Path, *, box: int = 64, apix: float | None = None,
                 n_particles: int = 1000, snr: float = 0.1, n_states: int | None = None,
                 populations: np.ndarray | None = None, resolution_A: float | None = None,
                 defocus_range_A: tuple[float, float] = (10000.0, 25000.0), seed: int = 0,
                 device: str = "cpu", log: logging.Logger | None = None,
                 progress: Callable | None = None, shift_max_px: float | None = None,
                 defocus_lognormal: bool = False, astigmatism_A: float = 500.0,
                 top_view_fraction: float = 0.0) -> BenchmarkDataset:
    """Simulate benchmark ``name`` into ``out_dir`` and return it.

    ``snr``: signal-to-noise ratio of the images (signal variance / noise variance); ``defocus_range_A``:
    defocus drawn uniformly in this range (Å, with RELION's default 300 kV, Cs 2.7 mm, 10% amplitude
    contrast; ``defocus_lognormal``: log-normal within it); ``shift_max_px``: origins uniform in ±this many
    pixels (default: Gaussian of 2 Å); ``top_view_fraction``: that fraction of the particles near the top view
    (preferred orientations, ``simulate.draw_particles``); ``populations`` (K,): fraction of particles per true
    map (default ``default_populations``); ``progress``: a RunContext.progress-like wrapper for the simulator's
    loops.
    """
    from cryohet.simulate.cryobench import write_frames
    from cryohet.simulate.simulate import simulate_particles

    out_dir = Path(out_dir)
    apix = float(apix or default_apix(box, name))
    if log is not None:
        log.info("benchmark %s: building the true maps (box %d, %.3g Å/px)", name, box, apix)
    conf = build_conformations(name, box, apix, n_states, resolution_A, device, seed)
    k = conf.n_states
    pops = default_populations(name, k) if populations is None else np.asarray(populations, dtype=np.float64)
    if pops.shape != (k,) or np.any(pops < 0) or pops.sum() <= 0:
        raise ValueError(f"populations must be {k} non-negative numbers (one per state), got {pops.tolist()}")
    pops = pops / pops.sum()
    simulate_particles(conf, out_dir, n_particles=n_particles, snr=snr, populations=pops,
                       defocus_range_A=tuple(defocus_range_A), seed=seed, device=device, progress=progress,
                       shift_max_A=None if shift_max_px is None else shift_max_px * apix,
                       defocus_lognormal=defocus_lognormal, astigmatism_A=astigmatism_A,
                       top_view_fraction=top_view_fraction)
    write_frames(out_dir / "trajectory", conf)
    if name == "junk":
        _junk(out_dir, conf, seed, device)
    doc = {"format": BENCHMARK_FORMAT, "name": name, "description": DATASETS[name], "kind": conf.kind,
           "n_particles": int(n_particles), "n_states": k, "latent_dim": conf.dim, "box": box, "apix": apix,
           "snr": snr, "defocus_range_A": list(defocus_range_A), "defocus_lognormal": defocus_lognormal,
           "astigmatism_A": astigmatism_A, "shift_max_px": shift_max_px,
           "top_view_fraction": top_view_fraction, "seed": seed, "populations": pops.tolist(),
           "state_tau": conf.tau.tolist(), "maps": [f"maps/state_{i:03d}.mrc" for i in range(k)],
           "motion": {k_: v for k_, v in conf.meta.items() if _jsonable(v)}}
    with atomic_path(out_dir / BENCHMARK_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return load_dataset(out_dir)


def _junk(out_dir: Path, conf: Conformations, seed: int, device: str) -> None:
    """Replace ``JUNK_FRACTION`` of the particles (rows of the common state 0) by junk images."""
    from cryohet.simulate.junk import add_junk, other_molecule_map, pick_junk
    from cryohet.simulate.molecules import default_molecule

    with np.load(out_dir / "ground_truth.npz") as gt:
        state = gt["state"]
    kind = pick_junk(state, 0, JUNK_FRACTION, np.random.default_rng([seed, 0x7A4B]))
    other = other_molecule_map(default_molecule(), conf.box, conf.apix, conf.meta["resolution_A"], device)
    add_junk(out_dir, conf.maps[0], other, kind, seed, device=device)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def load_dataset(root: str | Path) -> BenchmarkDataset:
    """Read a benchmark folder; InputError when it is not one or is incomplete."""
    root = Path(root)
    path = root / BENCHMARK_FILE
    if not path.is_file():
        raise InputError(root, f"not a benchmark dataset (no {BENCHMARK_FILE}; make one with cryohet benchmark-make)")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != BENCHMARK_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        state_tau = np.asarray(doc["state_tau"], dtype=np.float64).reshape(len(doc["state_tau"]), -1)
        map_paths = [root / p for p in doc["maps"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"malformed benchmark description ({exc})") from None
    for p in map_paths:
        if not p.is_file():
            raise InputError(p, "true map of the benchmark is missing")
    gt_path = root / "ground_truth.npz"
    try:
        with np.load(gt_path, allow_pickle=False) as gt:
            state = np.asarray(gt["state"], dtype=np.int64).ravel()
            tau = np.asarray(gt["tau"], dtype=np.float64).reshape(len(state), -1)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(gt_path, f"cannot read the per-particle ground truth ({exc})") from None
    if state.min() < 0 or state.max() >= len(map_paths):
        raise InputError(gt_path, f"states run {state.min()}..{state.max()} but there are {len(map_paths)} maps")
    pops = np.bincount(state, minlength=len(map_paths)) / len(state)
    return BenchmarkDataset(root=root, name=doc["name"], kind=doc["kind"], state=state, tau=tau,
                            state_tau=state_tau, populations=pops, map_paths=map_paths, box=int(doc["box"]),
                            apix=float(doc["apix"]), meta=doc)
