"""What ``cryohet nma`` writes from normal modes: the mode table, maps along a mode, ChimeraX scripts that play a
mode's movie beside its maps, and the figure (eigenvalues, collectivity, fluctuations against B-factors)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cryohet.analysis.plots import save_png
from cryohet.analysis.volumes import contour_level
from cryohet.atomic import atomic_path
from cryohet.geometry.gaussians import gaussian_map
from cryohet.io.mrc import write_map
from cryohet.io.normal_modes import NormalModes


def write_modes_csv(path: str | Path, nm: NormalModes) -> Path:
    """One row per mode: mode (1 = lowest non-rigid), eigenvalue (γ/Å²), collectivity, fluctuation_fraction (the
    mode's share of Σ 1/λ, i.e. of the atoms' square fluctuations over the modes computed)."""
    path = Path(path)
    inv = 1.0 / nm.eigenvalues
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "eigenvalue", "collectivity", "fluctuation_fraction"])
        for k, (lam, kappa, frac) in enumerate(zip(nm.eigenvalues, nm.collectivity, inv / inv.sum()), 1):
            w.writerow([k, f"{lam:.8g}", f"{kappa:.6f}", f"{frac:.6f}"])
    return path


def box_around(frames_A: np.ndarray, apix: float, margin_A: float) -> tuple[int, np.ndarray]:
    """The smallest even box (voxels) that holds every position of ``frames_A`` (..., 3) with ``margin_A`` on
    each side, and its centre (x, y, z) Å on the voxel grid of the positions' frame."""
    pts = np.asarray(frames_A).reshape(-1, 3)
    lo, hi = pts.min(0), pts.max(0)
    centre = np.round((lo + hi) / 2 / apix) * apix
    half = np.max(np.maximum(hi - centre, centre - lo)) + margin_A
    box = int(np.ceil(2 * half / apix))
    return box + box % 2, centre


def write_mode_maps(folder: str | Path, prefix: str, frames_A: np.ndarray, weight: np.ndarray, box: int,
                    apix: float, resolution_A: float, centre_A: np.ndarray, device: torch.device | str = "cpu"
                    ) -> tuple[list[Path], float]:
    """Maps ``folder/<prefix>_000.mrc``... of each frame (F, N, 3) rendered as Gaussians at ``resolution_A``
    (``centre_A`` at voxel box//2, header origin set so that ChimeraX lays them on the atoms); returns the files
    and one contour level for all (the median of each map's ``contour_level``)."""
    folder = Path(folder)
    origin = np.asarray(centre_A, dtype=np.float64) - (box // 2) * apix
    files, levels = [], []
    for i, xyz in enumerate(frames_A):
        vol = gaussian_map(xyz, weight, box, apix, resolution_A, centre_A, device)
        path = folder / f"{prefix}_{i:03d}.mrc"
        write_map(path, vol, apix, origin_A=origin)
        files.append(path)
        levels.append(contour_level(vol))
    return files, float(np.median(levels))


def write_mode_chimerax(path: str | Path, movie: Path, maps: list[Path], level: float, title: str) -> Path:
    """A ChimeraX script that opens a mode's movie (a multi-model PDB/mmCIF as one trajectory, #1) and its maps
    (a volume series, #2) and plays both back and forth. Files are named relative to the script's folder."""
    path = Path(path)

    def rel(p: Path) -> str:
        name = Path(p).resolve().relative_to(path.parent.resolve()).as_posix()
        return f'"{name}"' if " " in name else name

    lines = [f"# {title}", f"# open {path.name} in ChimeraX (from its folder): #1 the atoms, #2 the maps",
             f"open {rel(movie)} coordsets true", f"open {' '.join(rel(m) for m in maps)} vseries true",
             f"volume #2 style mesh level {level:.6g} color #7fa7d8", "view",
             f"coordset #1 1,{len(maps)} pauseFrames 4 loop 1000 bounce true",
             "vseries play #2 loop true direction oscillate", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def plot_modes(path: str | Path, nm: NormalModes, b_factor: np.ndarray | None = None) -> Path:
    """Eigenvalue and collectivity per mode, and each node's square fluctuation over the modes (Å² for γ = kT)
    beside the model's B-factors (scaled to the same mean) with their correlation."""
    fig = Figure(figsize=(12, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    k = np.arange(1, len(nm.eigenvalues) + 1)
    ax1.plot(k, nm.eigenvalues, "o-", ms=3)
    ax1.set(xlabel="mode", ylabel="eigenvalue (γ/Å²)", title="ANM eigenvalues")
    ax2.bar(k, nm.collectivity, color="#3b6ea5")
    ax2.set(xlabel="mode", ylabel="collectivity", ylim=(0, 1), title="collectivity")
    sq = nm.square_fluctuations()
    ax3.plot(sq, lw=1, label="ANM square fluctuations")
    title = "fluctuations per node"
    if b_factor is not None and np.ptp(b_factor) > 0:
        ax3.plot(b_factor * sq.mean() / b_factor.mean(), lw=1, alpha=0.7, label="B-factor (scaled)")
        title += f" (r = {np.corrcoef(sq, b_factor)[0, 1]:.2f} with B)"
    ax3.set(xlabel="node (residue or atom, file order)", ylabel="Å² (γ = kT)", title=title)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
