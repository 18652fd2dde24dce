"""Every method's per-particle goodness of fit as outputs: the STAR columns, a histogram and a log line."""
from __future__ import annotations

from typing import Any

import numpy as np

from cryohet.validation.goodness import FIT_Z, RESIDUAL_Z, Predictor, score_particles

#: Particles with ``cryohetFitZ`` above this are counted in the log as poorly explained (about 1 in 740 of
#: particles their model explains).
POOR_FIT_Z = 3.0


FIT_PLOT = "fit_z.png"


def register_fit_plot(ctx: Any) -> None:
    """Record ``fit_z.png`` (written by ``fit_columns``) as the run's plot (every rank of a distributed run)."""
    ctx.add("plot", FIT_PLOT, "per-particle goodness of fit (cryohetFitZ histogram)")


def fit_columns(ctx: Any, particles: Any, predict: Predictor, reference: Predictor | None = None,
                box: int | None = None, batch_size: int = 256, amp: str = "no", max_freq: float = 0.5
                ) -> dict[str, np.ndarray]:
    """Score every particle under ``predict`` against a typical particle under ``reference`` (see
    ``validation.goodness``; ``amp``: the predictors under the trainer's mixed precision; ``max_freq``: the
    model's fitted circle, cycles/pixel of ``box``), write ``fit_z.png``
    and return the STAR columns ``cryohetFitZ`` and ``cryohetResidualZ`` for the method's particles STAR."""
    from cryohet.analysis.plots import histogram_plot

    scores = score_particles(particles, predict, reference, box=box, device=ctx.device, batch_size=batch_size,
                             seed=ctx.seed, progress=ctx.progress, amp=amp,
                             max_freq=max_freq)
    poor = int((scores.fit_z > POOR_FIT_Z).sum())
    ctx.log.info("goodness of fit: cryohetFitZ median %.2f, %d of %d particles above %g (model scale %.4g, noise "
                 "from %d particles)", float(np.median(scores.fit_z)), poor, len(scores.fit_z), POOR_FIT_Z,
                 scores.noise.scale, scores.noise.n_sample)
    histogram_plot(scores.fit_z, ctx.out_dir / FIT_PLOT,
                   xlabel=f"{FIT_Z}: evidence short of a typical particle's, noise s.d. (0: explained; large: junk)",
                   title=f"per-particle goodness of fit ({poor} of {len(scores.fit_z)} above {POOR_FIT_Z:g})")
    register_fit_plot(ctx)
    return {FIT_Z: scores.fit_z, RESIDUAL_Z: scores.residual_z}
