"""Homogeneous reconstruction with half-maps and FSC: the baseline every heterogeneity method is compared to."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryohet.methods.base import DATADIR, Method, Param

if TYPE_CHECKING:
    import torch

PARAMS = (
    Param("particles", Path, None, "Particles with poses and CTF: RELION STAR (3.0/3.1/5) or cryoSPARC .cs.",
          required=True, input_role="particles"),
    Param("mask", Path, None, "Optional 3-D mask (MRC, same box as the output) for the masked FSC.",
          input_role="mask"),
    DATADIR,
    Param("box", int, 0, "Output box in pixels, by Fourier cropping the images (even; 0 keeps the images' box). "
          "The output pixel size is apix × input box / box Å.", min=0),
    Param("wiener", str, "auto", "Regularisation: auto (Wiener filter with the SSNR from the half-map FSC), none "
          "(plain CTF-weighted division, as relion_reconstruct), or a number c (constant SSNR 1/c)."),
    Param("batch_size", int, 256, "Images per batch.", min=1, expert=True),
)


def _check_wiener(value: str) -> str:
    if value in ("auto", "none"):
        return value
    try:
        if float(value) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--wiener: expected auto, none or a positive number, got {value!r}") from None
    return value


def read_mask(path: Path | None, box: int, device: torch.device) -> torch.Tensor | None:
    """The mask of ``--mask`` on ``device`` (None without one); InputError naming it when its box is not ``box``."""
    if path is None:
        return None
    import torch

    from cryohet.errors import InputError
    from cryohet.io.mrc import read_map

    mask_arr, _ = read_map(path)
    if mask_arr.shape[0] != box:
        raise InputError(path, f"mask box {mask_arr.shape[0]} does not match the output box {box}")
    return torch.as_tensor(mask_arr, device=device)


def run(params: dict[str, Any], ctx) -> None:
    import numpy as np
    import torch

    from cryohet.analysis.fsc_files import plot_fsc, write_fsc_star
    from cryohet.io.mrc import write_map
    from cryohet.io.particles import load_particles, write_particles_star
    from cryohet.methods._fit_outputs import fit_columns
    from cryohet.reconstruct.homogeneous import particle_halves, reconstruct_halves
    from cryohet.validation.goodness import maps_predictor

    wiener = _check_wiener(params["wiener"])
    pset = load_particles(params["particles"], datadir=params["datadir"])
    box = params["box"] or pset.box
    if box % 2 or box > pset.box:
        raise ValueError(f"--box: expected an even size no larger than the images' {pset.box}, got {box}")
    mask = read_mask(params["mask"], box, ctx.device)
    half = particle_halves(pset, ctx.seed)
    ctx.log.info("%d particles, box %d at %.3f Å/px -> box %d; half-sets of %d and %d", len(pset), pset.box,
                 pset.apix, box, (half == 1).sum(), (half == 2).sum())
    rec = reconstruct_halves(pset, half, params["batch_size"], ctx.device, box=box, wiener=wiener, mask=mask,
                             progress=ctx.progress)
    out = ctx.out_dir
    write_map(out / "half1.mrc", rec.half1.cpu().numpy(), rec.apix)
    write_map(out / "half2.mrc", rec.half2.cpu().numpy(), rec.apix)
    write_map(out / "map.mrc", rec.full.cpu().numpy(), rec.apix)
    star = write_fsc_star(out / "fsc.star", rec.box, rec.apix, rec.fsc, rec.fsc_masked)
    curves = {"unmasked": rec.fsc} | ({"masked": rec.fsc_masked} if rec.fsc_masked is not None else {})
    png = plot_fsc(out / "fsc.png", rec.box, rec.apix, curves)
    # each particle against the half-map it is not in (its own noise is not in its model)
    other_half = np.stack([half == 2, half == 1], 1)
    fit = fit_columns(ctx, pset, maps_predictor(torch.stack([rec.half1, rec.half2]), other_half), box=box,
                      batch_size=params["batch_size"])
    write_particles_star(out / "particles.star", pset, extra_columns={"rlnRandomSubset": half} | fit)
    res = rec.resolution(0.143)
    ctx.log.info("resolution at FSC 0.143: %.2f Å (%s)", res, "masked" if mask is not None else "unmasked")
    ctx.add("volume", "map.mrc", "reconstruction", apix=rec.apix, resolution_A=res)
    ctx.add("half_map", "half1.mrc", "half-map 1", apix=rec.apix)
    ctx.add("half_map", "half2.mrc", "half-map 2", apix=rec.apix)
    ctx.add("fsc", star, "half-map FSC", resolution_A=res)
    ctx.add("plot", png, "FSC curve")
    ctx.add("particles_star", "particles.star", "input particles with their half-set (rlnRandomSubset) and "
            "goodness of fit (cryohetFitZ, cryohetResidualZ)",
            n=len(pset))


METHOD = Method(
    name="reconstruct",
    order=20,
    title="Homogeneous reconstruction with half-maps and FSC",
    help="CTF-weighted Fourier backprojection (RELION conventions, padding 2, trilinear insertion, gridding "
         "correction) of two random half-sets (rlnRandomSubset when present), a Wiener filter from the half-map "
         "FSC, the FSC curve and the resolution at FSC 0.143, and each particle's goodness of fit against the "
         "half-map it is not in (cryohetFitZ, cryohetResidualZ). Writes map.mrc, half1.mrc, half2.mrc, fsc.star, "
         "fsc.png, fit_z.png and particles.star (input rows with rlnRandomSubset and the fit columns).",
    params=PARAMS,
    outputs=("volume", "half_map", "fsc", "plot", "particles_star"),
    run=run,
    citations=("Scheres SHW (2012) RELION: implementation of a Bayesian approach to cryo-EM structure "
               "determination. J Struct Biol 180:519-530.",),
)
