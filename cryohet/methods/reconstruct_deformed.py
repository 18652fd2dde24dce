"""``cryohet reconstruct-deformed``: the canonical map of a deformation model's run, each particle's deformation
undone, with half-maps and FSC beside the homogeneous reconstruction of the same particles."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryohet.methods.base import Method, Param
from cryohet.methods.reconstruct import PARAMS as RECONSTRUCT_PARAMS

PARAMS = (
    Param("run", Path, None, "Run folder of a deformation model (train-gmm, train-deform): its model (with a "
          "displacement field), its latents (.npy) and its particles STAR (rows aligned with the latents).",
          required=True, input_role="run"),
    *(p for p in RECONSTRUCT_PARAMS if p.name in ("mask", "datadir", "box", "wiener")),
    Param("batch_size", int, 64, "Images per batch (memory: batch × voxel_chunk × 48 bytes for the displaced "
          "voxels).", min=1, expert=True),
    Param("voxel_chunk", int, 16384, "Canonical voxels whose displacements are computed at once.", min=1,
          expert=True),
)


def run(params: dict[str, Any], ctx: Any) -> None:
    import torch

    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.io.mrc import write_map
    from cryohet.methods._deformed_inputs import check_memory, read_deformation_run
    from cryohet.methods.reconstruct import _check_wiener, read_mask
    from cryohet.reconstruct.deformed import reconstruct_deformed
    from cryohet.reconstruct.homogeneous import particle_halves

    wiener = _check_wiener(params["wiener"])
    inputs = read_deformation_run(Path(params["run"]).resolve(), params["datadir"])
    pset, model = inputs.particles, inputs.model
    box = params["box"] or pset.box
    if box % 2 or box > pset.box:
        raise ValueError(f"--box: expected an even size no larger than the images' {pset.box}, got {box}")
    check_memory(box, params["batch_size"], params["voxel_chunk"], ctx.device, inputs.star)
    mask = read_mask(params["mask"], box, ctx.device)
    half = particle_halves(pset, ctx.seed)
    ctx.log.info("%d particles, box %d at %.3f Å/px -> box %d; half-sets of %d and %d; %s model, latent "
                 "dimension %d", len(pset), pset.box, pset.apix, box, (half == 1).sum(), (half == 2).sum(),
                 inputs.model_type, inputs.latents.shape[1])
    if inputs.half_models is not None:  # half-set models: each half-map from its own half's model and latents
        models, latents = inputs.half_models, inputs.half_latents
        ctx.log.info("each half-set is reconstructed with its own half-set model (the run's rlnRandomSubset)")
    else:
        models, latents = (model, model), (inputs.latents, inputs.latents)
    for m in models:
        if hasattr(m, "to"):
            m.to(ctx.device)
    with torch.no_grad():
        rec = reconstruct_deformed(pset, latents, half, tuple(m.displacement_field for m in models),
                                   params["batch_size"], ctx.device, box=box, wiener=wiener, mask=mask,
                                   voxel_chunk=params["voxel_chunk"], progress=ctx.progress)
    out = ctx.out_dir
    maps = {"map.mrc": rec.corrected.full, "half1.mrc": rec.corrected.half1, "half2.mrc": rec.corrected.half2,
            "homogeneous.mrc": rec.homogeneous.full, "homogeneous_half1.mrc": rec.homogeneous.half1,
            "homogeneous_half2.mrc": rec.homogeneous.half2}
    apix = rec.corrected.apix
    for name, vol in maps.items():
        write_map(out / name, vol.cpu().numpy(), apix)
    res = {k: r.resolution(0.143) for k, r in (("corrected", rec.corrected), ("homogeneous", rec.homogeneous))}
    stars = {k: write_fsc_star(out / f"fsc_{k}.star", box, apix, r.fsc, r.fsc_masked)
             for k, r in (("corrected", rec.corrected), ("homogeneous", rec.homogeneous))}
    curve = "fsc_masked" if mask is not None else "fsc"
    png = plot_fsc(out / "fsc.png", box, apix, {"deformation-corrected": getattr(rec.corrected, curve),
                                                "homogeneous": getattr(rec.homogeneous, curve)})
    ctx.log.info("half-map resolution at FSC 0.143 (%s): corrected %.2f Å, homogeneous %.2f Å",
                 "masked" if mask is not None else "unmasked", res["corrected"], res["homogeneous"])
    src = str(inputs.run_dir)
    ctx.add("volume", "map.mrc", "deformation-corrected canonical map", apix=apix, resolution_A=res["corrected"],
            source_run=src, half_set_models=inputs.half_models is not None)
    ctx.add("half_map", "half1.mrc", "deformation-corrected half-map 1", apix=apix, of="map.mrc")
    ctx.add("half_map", "half2.mrc", "deformation-corrected half-map 2", apix=apix, of="map.mrc")
    ctx.add("volume", "homogeneous.mrc", "homogeneous reconstruction of the same particles", apix=apix,
            resolution_A=res["homogeneous"])
    for k in (1, 2):
        ctx.add("half_map", f"homogeneous_half{k}.mrc", f"homogeneous half-map {k}", apix=apix, of="homogeneous.mrc")
    ctx.add("fsc", stars["corrected"], "half-map FSC, deformation-corrected", resolution_A=res["corrected"])
    ctx.add("fsc", stars["homogeneous"], "half-map FSC, homogeneous", resolution_A=res["homogeneous"])
    ctx.add("plot", png, "half-map FSC: deformation-corrected and homogeneous")


METHOD = Method(
    name="reconstruct-deformed",
    order=47,
    title="Deformation-corrected reconstruction",
    help="The canonical map of a deformation model's run (train-gmm, train-deform): each particle's image, "
         "weighted by CTF / (CTF² weights + λ) of the homogeneous reconstruction of the same particles, is "
         "backprojected along rays bent by its displacement field at its latent point (two passes over the "
         "particles), for two half-sets (rlnRandomSubset or a seeded split); λ is the homogeneous "
         "reconstruction's Wiener regularisation (--wiener), made beside it. When the run trained a model on "
         "each half-set (train-gmm --halfsets), each half-map uses its own half's model and latents, so that the "
         "half-maps share no fitted deformation and their FSC is not inflated. Writes map.mrc, half1.mrc, "
         "half2.mrc, homogeneous.mrc, homogeneous_half1/2.mrc, fsc_corrected.star, fsc_homogeneous.star and "
         "fsc.png (both half-map FSC curves).",
    params=PARAMS,
    outputs=("volume", "half_map", "fsc", "plot"),
    run=run,
    citations=("Punjani A, Fleet DJ (2023) 3DFlex: determining structure and motion of flexible proteins from "
               "cryo-EM. Nat Methods 20:860-870.",
               "Schwab J, Kimanius D, Burt A, Dendooven T, Scheres SHW (2024) DynaMight: estimating molecular "
               "motions with improved reconstruction from cryo-EM images. Nat Methods 21:1855-1862."),
)
