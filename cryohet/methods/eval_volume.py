"""``cryohet eval-volume``: maps of a run's model of the volumes at given latent points."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryohet.atomic import atomic_path
from cryohet.methods.base import LATENT_POINT_PARAMS, Method, Param

PARAMS = (
    Param("run", Path, None, "Run folder of a heterogeneity method (its model of the volumes).", required=True,
          input_role="run"),
    *LATENT_POINT_PARAMS,
    Param("batch", int, 1, "Maps computed per model call (memory: batch·box³·4 bytes).", min=1, expert=True),
)


def run(params: dict[str, Any], ctx: Any) -> None:
    from cryohet.analysis.volumes import points_from_params, write_chimerax_script, write_volume_series
    from cryohet.models.base import load_volume_model

    if (params["z"] is None) == (params["z_file"] is None):
        raise ValueError("give exactly one of --z and --z_file")
    run_dir = Path(params["run"]).resolve()
    model = load_volume_model(run_dir)
    d = model.latent_dim
    z = points_from_params(params, d)
    ctx.log.info("model: latent dimension %d, box %d, %.4g Å/pixel; %d map(s)", d, model.box, model.apix, len(z))
    series = write_volume_series(model, z, ctx.out_dir, progress=ctx.progress, desc="maps", batch=params["batch"])
    with atomic_path(ctx.out_dir / "z_values.txt") as tmp:
        np.savetxt(tmp, z, fmt="%.6g", header="latent point of vol_000.mrc, vol_001.mrc, ...")
    src = str(run_dir)
    if len(series.files) == 1:
        ctx.add("volume", series.files[0], "map at z = " + ", ".join(f"{v:.4g}" for v in z[0]),
                z=z[0].astype(float).round(6).tolist(), apix=series.apix, source_run=src)
        return
    series.register(ctx, "eval", "map at a latent point", source_run=src)
    cxc = write_chimerax_script(ctx.out_dir / "volumes.cxc", series.files, series.level,
                                title=f"cryohet eval-volume: {len(series.files)} maps")
    ctx.add("chimerax", cxc, "ChimeraX: the maps as a series", series="eval", n_maps=len(series.files))


METHOD = Method(
    name="eval-volume",
    order=60,
    title="Maps at latent points",
    help="Generate the map of a run's model of the volumes at any latent point(s) z (or along a straight "
         "path between two points). Writes vol_000.mrc, ... with the model's voxel size, z_values.txt and, for "
         "several maps, a ChimeraX script volumes.cxc that opens them as a series.",
    params=PARAMS,
    outputs=("volume", "volume_series", "chimerax"),
    run=run,
)
