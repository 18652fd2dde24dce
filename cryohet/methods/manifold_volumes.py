"""``cryohet manifold-volumes``: many reconstructions of particle subsets, an embedding of those volumes, and the
particles' votes for the states of its clusters (AlphaCryo4D / StructMap class)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryohet.errors import InputError
from cryohet.methods.base import DATADIR, Method, Param

if TYPE_CHECKING:
    from cryohet.runner import RunContext

#: Fewest particles a class of a resample is expected to get (the resamples must hold this many per class).
MIN_PER_CLASS = 20
#: Fewest particles of a state that is reconstructed.
MIN_STATE_PARTICLES = 10

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF (RELION STAR or cryoSPARC .cs). Without "
          "--latents: the volumes are classes of resamples of them.", input_role="particles"),
    Param("latents", Path, None, "With --particles: their latents from any tool, in the particles' order (.npy, "
          ".txt/.csv or cryoDRGN's z.N.pkl): the volumes are reconstructions of the particles nearest k-means "
          "centres of the latents."),
    Param("run", Path, None, "Or the run folder of a heterogeneity method: its latents and its particles STAR "
          "(as --particles with --latents).", input_role="run"),
    DATADIR,
    Param("n_bootstrap", int, 20, "Without latents: resamples of the particles, each classified into --classes "
          "volumes. Resamples are balanced: each takes the particles drawn least often so far.", min=1),
    Param("subset_fraction", float, 0.5, "Without latents: fraction of the particles in each resample (drawn "
          "without replacement).", min=0.05, max=1.0),
    Param("classes", int, 4, "Without latents: classes (volumes) per resample.", min=2),
    Param("iterations", int, 10, "Without latents: EM iterations of each resample's 3-D classification (fixed "
          "poses, as classify).", min=1),
    Param("ini_high_A", float, 30.0, "Without latents: each classification starts from random subsets' maps "
          "low-passed to this resolution, Å.", min=0.0, expert=True),
    Param("n_volumes", int, 50, "With latents: volumes, at k-means centres of the latents.", min=3),
    Param("subset_size", int, 0, "With latents: particles nearest each centre that make its volume (plus the rest "
          "of its k-means cluster). 0: max(100, 4 × particles / --n_volumes).", min=0),
    Param("resolution_A", float, 15.0, "The volumes are compared (embedded) at this resolution, Å: low-passed and "
          "Fourier-cropped to a box whose Nyquist reaches it.", min=1.0),
    Param("box", int, 0, "Box of the subsets' reconstructions (and classifications), px, by Fourier cropping the "
          "images (even). 0: the smallest box whose Nyquist reaches --resolution_A (at least 16 px).", min=0),
    Param("mask_diameter_A", float, 0.0, "Diameter (Å) of the soft sphere inside which the volumes are compared "
          "(0: 1.1 × the extent of the mean volume).", min=0.0, expert=True),
    Param("dims", int, 2, "Embedding dimensions (also those of each particle's coordinate, latents.npy).", min=1,
          max=4),
    Param("embedding", str, "auto", "Embedding of the volumes: diffusion (a density-free diffusion map of their "
          "distances), pca (classical scaling), or auto (diffusion from 8 volumes on).",
          choices=("auto", "diffusion", "pca"), expert=True),
    Param("neighbours", int, 10, "Diffusion-map bandwidth: every volume has this many neighbours within it.",
          min=2, expert=True),
    Param("n_states", int, 4, "States: clusters of the embedded volumes (k-means weighted by members), numbered "
          "along the first coordinate. Each particle takes the state most of its volumes belong to.", min=2),
    Param("write_volumes", bool, False, "Also write every subset volume (volumes/vol_XXX.mrc, on the working box) "
          "with a ChimeraX series."),
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
)





def _check_sizes(params: dict[str, Any], n: int, source: Path, latents: bool) -> int:
    """InputError when ``n`` particles are too few for the subsets asked for; the latent subsets' size."""
    if latents:
        M = params["n_volumes"]
        size = params["subset_size"] or max(100, -(-4 * n // M))
        if n < 2 * M:
            raise InputError(source, f"{n} particles: too few for --n_volumes {M} (at least 2 particles a volume)")
        if size > n // 2:
            which = "--subset_size" if params["subset_size"] else "the default --subset_size (max(100, 4N/M))"
            raise InputError(source, f"{n} particles: {which} of {size} is more than half of them, so the volumes "
                                     f"would all look alike; give a smaller --subset_size or more particles")
        if size < MIN_PER_CLASS:
            raise ValueError(f"--subset_size {size}: at least {MIN_PER_CLASS} particles make a volume")
        if M < params["n_states"]:
            raise ValueError(f"--n_states {params['n_states']} is more than --n_volumes {M}")
        return size
    per_class = params["subset_fraction"] * n / params["classes"]
    if per_class < MIN_PER_CLASS:
        raise InputError(source, f"{n} particles: a resample of --subset_fraction {params['subset_fraction']:g} "
                                 f"holds {round(params['subset_fraction'] * n)}, {per_class:.0f} per class for "
                                 f"--classes {params['classes']}; at least {MIN_PER_CLASS} per class are needed")
    if params["n_bootstrap"] * params["classes"] < params["n_states"]:
        raise ValueError(f"--n_states {params['n_states']} is more than the {params['n_bootstrap']} × "
                         f"{params['classes']} volumes of --n_bootstrap × --classes")
    return 0


def _boxes(params: dict[str, Any], pset) -> tuple[int, int, float]:
    """(working box, embedding box, the embedding copies' Å/px)."""
    from cryohet.analysis.volume_manifold import embedding_box

    # by default the subsets are classified and reconstructed at the embedding's box: on the hinge benchmark (box
    # 64, 2 Å/px, SNR 0.1, 2000 particles, 20 resamples of 4 classes, 15 Å) classifying at 38 px instead of 20 px
    # took 152 s instead of 68 s for the same result (Spearman 0.77 with the true motion, state purity 0.57)
    work = params["box"] or embedding_box(pset.box, pset.apix, params["resolution_A"])
    if work % 2 or work > pset.box or work < 8:
        raise ValueError(f"--box: expected an even size from 8 to the images' {pset.box} px, got {work}")
    work_apix = pset.apix * pset.box / work
    emb = embedding_box(work, work_apix, params["resolution_A"])
    return work, emb, work_apix * work / emb


def _checked(ctx: RunContext):
    """A progress wrapper without bars or log lines that still honours an abort request at each step."""
    def wrap(items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
        for item in items:
            ctx.check_abort()
            yield item
    return wrap


def run(params: dict[str, Any], ctx: RunContext) -> None:
    from cryohet.analysis import volume_manifold as V
    from cryohet.analysis.manifold_plots import plot_volume_manifold
    from cryohet.analysis.runs import latent_inputs
    from cryohet.atomic import atomic_path, save_npy
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import write_particles_star
    from cryohet.reconstruct.homogeneous import particle_halves

    inputs = latent_inputs(params, need_latents=False)
    pset, z, zpath = inputs.particles, inputs.z, inputs.source
    n = len(pset)
    subset_size = _check_sizes(params, n, zpath or pset.source, z is not None)
    work_box, embed_box, embed_apix = _boxes(params, pset)
    half = particle_halves(pset, ctx.seed)
    out = ctx.out_dir
    written: list[Path] = []
    levels: list[float] = []

    def keep(i: int, vol, apix: float) -> None:
        from cryohet.analysis.volumes import contour_level

        (out / "volumes").mkdir(exist_ok=True)
        arr = vol.detach().cpu().numpy()
        written.append(out / "volumes" / f"vol_{i:03d}.mrc")
        write_map(written[-1], arr, apix)
        levels.append(contour_level(arr))

    hook = keep if params["write_volumes"] else None
    centres = None
    if z is None:
        B, K = params["n_bootstrap"], params["classes"]
        ctx.log.info("%d particles; %d resamples of %.0f %% each classified into %d classes (%d EM iterations) at "
                     "box %d (%.3g Å/px); volumes compared at %g Å (box %d)", n, B, 100 * params["subset_fraction"],
                     K, params["iterations"], work_box, pset.apix * pset.box / work_box, params["resolution_A"],
                     embed_box)
        vols = V.bootstrap_volumes(pset, half, n_resamples=B, fraction=params["subset_fraction"], n_classes=K,
                                   work_box=work_box, embed_box=embed_box, resolution_A=params["resolution_A"],
                                   iterations=params["iterations"], ini_high_A=params["ini_high_A"],
                                   batch_size=params["batch_size"], device=ctx.device, seed=ctx.seed, log=ctx.log,
                                   progress=ctx.progress, em_progress=_checked(ctx), on_volume=hook)
        if vols.dropped:
            ctx.log.warning("%d of %d classes held fewer than %d particles (or %.0f %% of their resample) and give "
                            "no volume", vols.dropped, B * K, V.MIN_MEMBERS, 100 * V.MIN_MEMBER_FRACTION)
    else:
        ctx.log.info("%d particles with %d-D latents (%s); %d volumes of the %d particles nearest k-means centres "
                     "(plus their clusters) at box %d (%.3g Å/px); volumes compared at %g Å (box %d)", n,
                     z.shape[1], zpath, params["n_volumes"], subset_size, work_box, pset.apix * pset.box / work_box,
                     params["resolution_A"], embed_box)
        vols, centres = V.latent_volumes(pset, half, z, n_volumes=params["n_volumes"], subset_size=subset_size,
                                         work_box=work_box, embed_box=embed_box, resolution_A=params["resolution_A"],
                                         batch_size=params["batch_size"], device=ctx.device, seed=ctx.seed,
                                         progress=ctx.progress, on_volume=hook)
    M = len(vols)
    if M < params["n_states"] or M < params["dims"] + 1:
        raise ValueError(f"{M} volumes: too few for --n_states {params['n_states']} and --dims {params['dims']}")
    X, radius_A = V.volume_vectors(vols.volumes, vols.apix, params["mask_diameter_A"])
    d2 = V.squared_distances(X)
    emb = V.embed(d2, params["dims"], params["embedding"], params["neighbours"])
    counts = vols.counts
    vstate, state_centres = V.cluster_states(emb.coords, counts.astype(np.float64), params["n_states"], ctx.seed)
    ctx.log.info("%d volumes (%d-%d particles each) compared inside a %.0f Å sphere; %s embedding (eigenvalues %s); "
                 "%d states of %s volumes", M, counts.min(), counts.max(), 2 * radius_A, emb.method,
                 ", ".join(f"{v:.4g}" for v in emb.eigenvalues), params["n_states"],
                 ", ".join(str(int((vstate == s).sum())) for s in range(params["n_states"])))
    y = V.particle_coordinates(vols.members, emb.coords, n)
    votes = V.vote(vols.members, vstate, n, params["n_states"], prefer=V.nearest_state(y, state_centres))
    missing = votes.state < 0
    if missing.any():
        ctx.log.warning("%d particles were in no volume (--n_bootstrap × --subset_fraction below 1): state -1, and "
                        "the mean coordinate of the others", int(missing.sum()))
        y[missing] = np.nanmean(y, axis=0)
    ctx.log.info("particles per state: %s; median fraction of a particle's votes for its state %.2f",
                 ", ".join(str(int((votes.state == s).sum())) for s in range(params["n_states"])),
                 float(np.median(votes.fraction[~missing])))

    # ---- outputs
    names = [f"{emb.method}{k + 1}" for k in range(params["dims"])]
    save_npy(out / "latents.npy", y.astype(np.float32))
    ctx.add("latents", "latents.npy", f"each particle's mean embedding coordinate over its volumes (N, "
            f"{params['dims']})", dim=int(params["dims"]), axes=names)
    with atomic_path(out / "volume_manifold.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, coords=emb.coords, eigenvalues=emb.eigenvalues, d2=d2, state=vstate, members=counts,
                 source=vols.source, resolution_A=vols.resolution_A, state_centres=state_centres,
                 member_particle=np.concatenate(vols.members),
                 member_volume=np.repeat(np.arange(M), counts),
                 **({"latent_centres": centres} if centres is not None else {}))
    ctx.add("model", "volume_manifold.npz", "the subset volumes' embedding (coords), squared distances (d2), "
            "states, member counts, origin (resample, class) and memberships (member_particle, member_volume)",
            model_type="volume_manifold", method=emb.method,
            n_volumes=M, epsilon=emb.epsilon, eigenvalues=np.round(emb.eigenvalues, 6).tolist(),
            mask_radius_A=round(radius_A, 2), embed_box=embed_box, embed_apix=round(embed_apix, 4))
    table = np.column_stack([np.arange(M), vols.source, counts, vols.resolution_A, emb.coords, vstate])
    with atomic_path(out / "volumes.txt") as tmp:
        np.savetxt(tmp, table, fmt=["%d", "%d", "%d", "%d", "%.2f"] + ["%.6g"] * params["dims"] + ["%d"],
                   header="volume " + ("resample class" if z is None else "centre -") + " members resolution_A "
                          + " ".join(names) + " state")
    ctx.add("report", "volumes.txt", "per subset volume: origin, members, resolution, embedding, state",
            n_volumes=M)
    png = plot_volume_manifold(out / "volume_manifold.png", emb.coords, counts, vstate, y, votes, emb.method)
    ctx.add("plot", png, "the volumes' embedding by state; the particles' coordinates; their vote fractions")
    # rlnClassNumber = state + 1 (0: in no volume), with the state maps, half-maps and subsets marked by meta
    # class_number as classify's: the hosts then see the states as 3-D classes
    columns = {"cryohetState": votes.state, "cryohetStateVotes": votes.fraction,
               "cryohetVolumeCount": votes.n_volumes, "rlnClassNumber": votes.state + 1, "rlnRandomSubset": half}
    columns.update({f"cryohetVolumeManifold{k + 1}": y[:, k] for k in range(params["dims"])})
    write_particles_star(out / "particles.star", pset, extra_columns=columns)
    ctx.add("particles_star", "particles.star", "particles with their state (cryohetState, -1: in no volume; "
            "rlnClassNumber = state + 1), the fraction of their votes for it (cryohetStateVotes) and their "
            "coordinate (cryohetVolumeManifoldK)", n=n, states=params["n_states"])
    _state_maps(params, ctx, pset, half, votes, state_centres)   # first: the hosts' main series is the first
    if written:
        from cryohet.analysis.volumes import register_series

        register_series(ctx, written, emb.coords, pset.apix * pset.box / work_box, levels, "subsets",
                        "subset volume", out / "volumes.cxc", "cryohet manifold-volumes: subset volumes",
                        per_map={"n_particles": counts.tolist(), "state": vstate.tolist()})


def _state_maps(params: dict[str, Any], ctx: RunContext, pset, half: np.ndarray, votes, centres: np.ndarray) -> None:
    """Per state: its particles' STAR and a reconstruction of them from two half-sets at the images' box (map,
    half-maps, FSC), the maps registered as one series."""
    from cryohet.analysis.fsc_files import write_fsc_star
    from cryohet.analysis.volumes import contour_level, register_series
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import write_particles_star
    from cryohet.reconstruct.fsc import resolution_at
    from cryohet.reconstruct.homogeneous import reconstruct_halves

    out = ctx.out_dir
    (out / "states").mkdir(exist_ok=True)
    files, levels, points = [], [], []
    per_map: dict[str, list[Any]] = {"n_particles": [], "resolution_A": [], "state": [], "class_number": []}
    for s in ctx.progress(range(params["n_states"]), "state maps", params["n_states"]):
        rows = np.flatnonzero(votes.state == s)
        if len(rows) == 0:
            ctx.log.warning("state %d has no particles: each particle's volumes lie mostly in other states (fewer "
                            "--n_states may suit the data)", s)
            continue
        name = f"particles_state_{s:03d}.star"
        write_particles_star(out / name, pset, rows=rows)
        ctx.add("particles_star", name, f"particles of state {s}", n=len(rows), index=s, class_number=s + 1,
                point=centres[s].round(5).tolist())
        if len(rows) < MIN_STATE_PARTICLES or len(np.unique(half[rows])) < 2:
            ctx.log.warning("state %d has %d particles: too few for a map", s, len(rows))
            continue
        rec = reconstruct_halves(pset.subset(rows), half[rows], params["batch_size"], ctx.device)
        stem = f"states/state_{s:03d}"
        for suffix, vol in (("", rec.full), ("_half1", rec.half1), ("_half2", rec.half2)):
            write_map(out / f"{stem}{suffix}.mrc", vol.cpu().numpy(), rec.apix)
        for j in (1, 2):
            ctx.add("half_map", f"{stem}_half{j}.mrc", f"state {s} half-map {j}", index=s, class_number=s + 1,
                    apix=rec.apix)
        res = resolution_at(rec.fsc, rec.box, rec.apix)
        write_fsc_star(out / f"{stem}_fsc.star", rec.box, rec.apix, rec.fsc)
        ctx.add("fsc", f"{stem}_fsc.star", f"state {s} half-map FSC", index=s, resolution_A=round(res, 3))
        ctx.log.info("state %d: %d particles, %.2f Å at FSC 0.143", s, len(rows), res)
        files.append(out / f"{stem}.mrc")
        levels.append(contour_level(rec.full.cpu().numpy()))
        points.append(centres[s])
        per_map["n_particles"].append(int(len(rows)))
        per_map["resolution_A"].append(round(res, 3))
        per_map["state"].append(s)
        per_map["class_number"].append(s + 1)
    if files:
        register_series(ctx, files, np.array(points), pset.apix, levels, "states", "state map",
                        out / "state_maps.cxc", "cryohet manifold-volumes: states", per_map=per_map)


METHOD = Method(
    name="manifold-volumes",
    order=58,
    title="States from a manifold of subset volumes",
    help="AlphaCryo4D / StructMap class: many volumes of particle subsets are embedded and clustered, and every "
         "particle votes for the states of the volumes it was in. Without latents the subsets are the classes of "
         "3-D classifications (fixed poses) of --n_bootstrap balanced resamples of the particles; with latents "
         "(--latents, or a --run of a heterogeneity method) they are the particles nearest k-means centres of the "
         "latents, overlapping. The volumes are low-passed to --resolution_A, masked, standardised and embedded "
         "from their distances by a density-free diffusion map (PCA for few volumes); k-means of the embedding "
         "gives --n_states states. Each particle takes its majority state (with the fraction of its votes) and "
         "the mean coordinate of its volumes (latents.npy, for landscape and kernel-volumes --run). Writes "
         "particles.star, particles_state_XXX.star, states/state_XXX.mrc with half-maps and FSC (a ChimeraX "
         "series), volume_manifold.png/.npz, volumes.txt and optionally volumes/vol_XXX.mrc.",
    params=PARAMS,
    outputs=("latents", "model", "report", "plot", "particles_star", "volume_series", "half_map", "fsc",
             "chimerax"),
    run=run,
    citations=("Wu Z, Chen E, Zhang S, Ma Y, Mao Y (2022) Visualizing conformational space of functional "
               "biomolecular complexes by deep manifold learning. Int J Mol Sci 23:8872.",
               "Sorzano COS, Alvarez-Cabrera AL, Kazemi M, Carazo JM, Jonić S (2016) StructMap: elastic distance "
               "analysis of electron microscopy maps for studying conformational changes. Biophys J 110:1753-1765.",
               "Coifman RR, Lafon S (2006) Diffusion maps. Appl Comput Harmon Anal 21:5-30."),
)
