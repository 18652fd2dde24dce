"""``cryohet nma``: elastic-network normal modes (ANM) of an atomic model, or of pseudo-atoms placed in a map."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.methods.base import Method, Param

PARAMS = (
    Param("model", Path, None, "Atomic model (PDB or mmCIF; first model; waters and hydrogens ignored).",
          input_role="atomic_model"),
    Param("map", Path, None, "Map (MRC) to place pseudo-atoms in when there is no atomic model (instead of "
          "--model); mode maps are then made in its box.", input_role="volume"),
    Param("threshold", float, None, "With --map: map value above which voxels become pseudo-atoms (the contour "
          "level of the molecule's surface; map units)."),
    Param("n_pseudo", int, 0, "With --map: number of pseudo-atoms; 0: one per --pseudo_spacing_A³ of the volume "
          "above --threshold.", min=0),
    Param("pseudo_spacing_A", float, 5.0, "With --map and --n_pseudo 0: spacing of the pseudo-atoms (Å).", min=1.0),
    Param("selection", str, "ca", "Network nodes of an atomic model: ca (one per residue: Cα of amino acids, P of "
          "nucleotides) or heavy (every non-hydrogen atom).", choices=("ca", "heavy")),
    Param("cutoff_A", float, 15.0, "Spring cutoff (Å): nodes closer than this are joined (ProDy's ANM default).",
          min=1.0),
    Param("gamma", float, 1.0, "Spring constant (eigenvalues are in its units per Å²).", min=1e-6),
    Param("n_modes", int, 20, "Non-rigid modes to compute (at most 3N-6 for N nodes).", min=1),
    Param("solver", str, "auto", "Eigen-solver: prody (ProDy's ANM on the CPU), torch (dense Hessian and "
          "torch.linalg.eigh on --device) or auto (torch on CUDA from 1500 nodes, else prody).",
          choices=("auto", "prody", "torch"), expert=True),
    Param("movie_modes", int, 6, "The lowest modes written as movies (multi-model PDB/mmCIF), map series and "
          "ChimeraX scripts; 0: none.", min=0),
    Param("amplitude_A", float, 3.0, "Movie amplitude: RMS displacement of the nodes at each end of a movie (Å).",
          min=0.0),
    Param("n_frames", int, 10, "Frames per movie (from -amplitude to +amplitude).", min=2),
    Param("resolution_A", float, 8.0, "Resolution of the mode maps and of the hand check (Å).", min=0.5),
    Param("apix", float, None, "Voxel size of the mode maps (Å); default: --map's or --reference_map's, else "
          "--resolution_A / 3.", min=0.05),
    Param("box", int, None, "Box of the mode maps (voxels, even); default: --map's or --reference_map's, else the "
          "smallest that holds every movie frame with a --resolution_A margin.", min=8),
    Param("reference_map", Path, None, "With --model: the map the model was placed in (MRC); the model must lie in "
          "its box with the same hand (checked), and the mode maps are made in its box."),
)


def _nodes(params: dict[str, Any], ctx: Any) -> tuple[Any, Any, tuple[np.ndarray, float] | None, Path]:
    """(network nodes, atoms the movies move, the map that sets the maps' box (volume, apix) or None, its file)."""
    from cryohet.errors import InputError
    from cryohet.io.atomic_model import check_hand, check_in_box, read_atoms
    from cryohet.io.mrc import read_map
    from cryohet.models.pseudo_atoms import place_pseudo_atoms, pseudo_atom_count

    if (params["model"] is None) == (params["map"] is None):
        raise ValueError("give exactly one of --model (an atomic model) and --map (pseudo-atoms in a map); a map "
                         "that a model was placed in is --reference_map")
    if params["model"] is not None:
        nodes = read_atoms(params["model"], params["selection"])
        atoms = read_atoms(params["model"], "heavy") if params["selection"] == "ca" else nodes
        ref = params["reference_map"]
        if ref is None:
            return nodes, atoms, None, Path(params["model"])
        vol, apix = read_map(ref)
        check_in_box(atoms, vol.shape[-1], apix)
        cc = check_hand(atoms, vol, apix, max(params["resolution_A"], 2 * apix), ref)
        ctx.log.info("the model fits %s with correlation %.3f (and better than mirrored)", ref, cc)
        return nodes, atoms, (vol, apix), Path(ref)
    if params["reference_map"] is not None:
        raise ValueError("--reference_map goes with --model (with --map, the map itself sets the box)")
    if params["threshold"] is None:
        raise ValueError("--map needs --threshold (the map value above which voxels become pseudo-atoms)")
    vol, apix = read_map(params["map"])
    n = params["n_pseudo"] or pseudo_atom_count(vol, apix, params["threshold"], params["pseudo_spacing_A"])
    if n < 3:
        raise InputError(params["map"], f"{n} pseudo-atoms above the threshold {params['threshold']:g}: too few for "
                                        "a network; lower --threshold or --pseudo_spacing_A")
    fit = place_pseudo_atoms(vol, apix, params["threshold"], n, params["map"], seed=params["seed"], device=ctx.device)
    ctx.report_convergence("pseudo-atom k-means (largest centre move, Å)", fit.converged, fit.last_move_A, fit.tol_A,
                           fit.iterations)
    ctx.log.info("%d pseudo-atoms placed in %s (%d k-means iterations)", n, params["map"], fit.iterations)
    return fit.atoms, fit.atoms, (vol, apix), Path(params["map"])


def _map_grid(params: dict[str, Any], frames: np.ndarray, ref: tuple[np.ndarray, float] | None
              ) -> tuple[int, float, np.ndarray]:
    """Box, voxel size and box centre (x, y, z) Å of the mode maps."""
    from cryohet.analysis.normal_modes import box_around
    from cryohet.io.atomic_model import box_centre_A

    if ref is not None:
        box, apix = ref[0].shape[-1], float(ref[1])
        return int(params["box"] or box), float(params["apix"] or apix), box_centre_A(box, apix)
    apix = float(params["apix"] or params["resolution_A"] / 3)
    box, centre = box_around(frames, apix, params["resolution_A"])
    if params["box"]:
        if params["box"] % 2:
            raise ValueError(f"--box must be even, got {params['box']}")
        box = params["box"]
    return box, apix, centre


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis.normal_modes import (
        plot_modes,
        write_mode_chimerax,
        write_mode_maps,
        write_modes_csv,
    )
    from cryohet.io.atomic_model import model_suffix, write_models
    from cryohet.io.normal_modes import write_normal_modes
    from cryohet.models.elastic_network import anm_modes, extend_to_residues, mode_frames

    nodes, atoms, ref, source = _nodes(params, ctx)
    selection = params["selection"] if params["model"] is not None else "pseudo"
    ctx.log.info("%d network nodes (%s) from %s; cutoff %.3g Å, gamma %.3g", len(nodes), selection, source,
                 params["cutoff_A"], params["gamma"])
    nm = anm_modes(nodes, params["n_modes"], params["cutoff_A"], params["gamma"], params["solver"], ctx.device,
                   selection, ctx.log)
    ctx.log.info("%d modes by the %s solver; eigenvalues %.4g to %.4g", len(nm.eigenvalues), nm.solver,
                 nm.eigenvalues[0], nm.eigenvalues[-1])
    out = ctx.out_dir
    write_normal_modes(out / "modes.npz", nm)
    ctx.add("normal_modes", "modes.npz", "ANM modes (eigenvalues, modes, atoms)", n_modes=len(nm.eigenvalues),
            n_nodes=len(nodes), selection=selection, solver=nm.solver, source=str(source))
    ctx.add("normal_modes", write_modes_csv(out / "modes.csv", nm).name, "mode table: eigenvalue, collectivity",
            format="csv")
    suffix = model_suffix(source, len(atoms))
    write_models(out / f"atoms{suffix}", nodes, nodes.xyz_A[None])
    ctx.add("atomic_model", f"atoms{suffix}", "the network's nodes", n_atoms=len(nodes))
    moved = extend_to_residues(nm, atoms) if atoms is not nodes else nm.modes
    n_movies = min(params["movie_modes"], len(nm.eigenvalues))
    movies = [mode_frames(atoms.xyz_A, moved[k], params["amplitude_A"], params["n_frames"], len(nodes))
              for k in range(n_movies)]
    if movies:
        box, apix, centre = _map_grid(params, np.stack(movies), ref)
        ctx.log.info("mode maps: box %d, %.4g Å/voxel, resolution %.3g Å", box, apix, params["resolution_A"])
    for k in ctx.progress(range(n_movies), "mode movies and maps", n_movies):
        name = f"mode_{k + 1:02d}"
        write_models(out / f"{name}{suffix}", atoms, movies[k])
        ctx.add("atomic_model", f"{name}{suffix}", f"mode {k + 1} movie", mode=k + 1, n_frames=params["n_frames"],
                amplitude_A=params["amplitude_A"])
        files, level = write_mode_maps(out / f"{name}_maps", "frame", movies[k], atoms.weight, box, apix,
                                       params["resolution_A"], centre, ctx.device)
        for i, f in enumerate(files):
            ctx.add("volume_series", f.relative_to(out), f"mode {k + 1} map [{i}]", series=name, index=i,
                    n_maps=len(files), apix=apix, level=level, mode=k + 1)
        cxc = write_mode_chimerax(out / f"{name}.cxc", out / f"{name}{suffix}", files, level,
                                  f"cryohet nma: mode {k + 1} (eigenvalue {nm.eigenvalues[k]:.4g}), "
                                  f"±{params['amplitude_A']:g} Å RMS")
        ctx.add("chimerax", cxc.name, f"ChimeraX: mode {k + 1} movie and maps", series=name, mode=k + 1)
    bfac = nodes.b_factor if nodes.b_factor is not None else None
    ctx.add("plot", plot_modes(out / "modes.png", nm, bfac).name, "eigenvalues, collectivity, fluctuations")


METHOD = Method(
    name="nma",
    order=21,
    title="Elastic-network normal modes",
    help="Normal modes of an anisotropic network model (ANM, as ProDy's) of an atomic model (Cα or heavy atoms) or "
         "of pseudo-atoms placed in a map (weighted k-means of the voxels above --threshold, one pseudo-atom per "
         "--pseudo_spacing_A³): springs of constant --gamma between nodes closer than --cutoff_A, the "
         "six rigid-body modes removed. Writes modes.npz (eigenvalues, unit modes, coordinates, atom names), "
         "modes.csv (eigenvalue, collectivity), atoms.pdb/.cif (the nodes), for the lowest --movie_modes modes a "
         "movie mode_NN.pdb/.cif (every atom moving with its residue), maps along it (mode_NN_maps/) and a ChimeraX "
         "script mode_NN.cxc that plays both, and modes.png (eigenvalues, collectivity, fluctuations against "
         "B-factors). With --reference_map the model is checked against the map's box and hand.",
    params=PARAMS,
    outputs=("normal_modes", "atomic_model", "volume_series", "chimerax", "plot"),
    run=run,
    needs_poses=False,
    citations=("Atilgan, Durell, Jernigan, Demirel, Keskin & Bahar (2001) Biophys. J. 80:505 (ANM)",
               "Bakan, Meireles & Bahar (2011) Bioinformatics 27:1575 (ProDy)",
               "Brüschweiler (1995) J. Chem. Phys. 102:3396 (collectivity)",
               "Wriggers, Milligan & McCammon (1999) J. Struct. Biol. 125:185 (vector quantisation of maps, Situs)"),
)
