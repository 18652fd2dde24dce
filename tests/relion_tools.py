"""Running Debian's RELION 3.1.3 binaries in tests (they must be installed: CI installs them)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from cryohet.geometry.euler import random_euler
from cryohet.io.star import read_star, write_star

THIRDPARTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "thirdparty" / "cryodrgn-tests"


def relion(*args: str, cwd: Path) -> None:
    """Run a RELION program (argument list), failing the test with its output when it fails."""
    exe = shutil.which(args[0])
    assert exe, f"{args[0]} not found: install Debian's relion package (CI does)"
    proc = subprocess.run([exe, *args[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}"


def relion_agreement(star: Path, true_map: np.ndarray, out: Path, apix: float, shells: slice = slice(6, 13)
                     ) -> float:
    """relion_reconstruct of ``star`` (``--ctf``, to 10 Å) into ``out`` and the mean FSC over ``shells`` of it with
    ``true_map``: how well the STAR's poses, read in RELION's conventions, reproduce the true map."""
    import torch

    from cryohet.io.mrc import read_map
    from cryohet.reconstruct.fsc import fsc

    relion("relion_reconstruct", "--i", str(star), "--o", str(out), "--ctf", "--angpix", f"{apix:g}", "--maxres",
           "10", cwd=star.parent)
    m, _ = read_map(out)
    return float(fsc(torch.as_tensor(m), torch.as_tensor(true_map))[shells].mean())


def pose_ctf_star(path: Path, n: int, box: int, apix: float, seed: int = 0, shift_sigma_A: float = 4.0,
                  extra_ctf: bool = False) -> pd.DataFrame:
    """Write a RELION 3.1 STAR of random poses, origins and CTFs (for relion_project --ang)."""
    rng = np.random.default_rng(seed)
    e = random_euler(n, rng)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    du = rng.uniform(10000, 25000, n)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@placeholder.mrcs" for i in range(n)],
        "rlnAngleRot": e[:, 0], "rlnAngleTilt": e[:, 1], "rlnAnglePsi": e[:, 2],
        "rlnOriginXAngst": rng.normal(0, shift_sigma_A, n), "rlnOriginYAngst": rng.normal(0, shift_sigma_A, n),
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 800, n), "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnOpticsGroup": np.ones(n, dtype=int), "rlnRandomSubset": rng.integers(1, 3, n),
    })
    if extra_ctf:
        parts["rlnPhaseShift"] = rng.uniform(0, 90, n)
        parts["rlnCtfBfactor"] = rng.uniform(0, 100, n)
        parts["rlnCtfScalefactor"] = rng.uniform(0.5, 1.0, n)
    write_star(path, {"optics": optics, "particles": parts})
    return parts


def noise_stack_star(d: Path, n: int, box: int, apix: float, sparse: bool = False) -> Path:
    """``d/p.star``: ``n`` random poses and CTFs (``pose_ctf_star``, seed 3) pointing at ``d/stack.mrcs``, a stack
    of Gaussian noise (``sparse``: an unwritten, all-zero sparse file, for runs refused before reading images)."""
    d.mkdir(exist_ok=True)
    star = d / "p.star"
    pose_ctf_star(star, n, box, apix, seed=3)
    blocks = read_star(star)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@stack.mrcs" for i in range(n)]
    write_star(star, blocks)
    with mrcfile.new_mmap(d / "stack.mrcs", (n, box, box), mrc_mode=2) as m:
        if not sparse:
            m.data[:] = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
        m.voxel_size = apix
    return star
