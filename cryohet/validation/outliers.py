"""How well a per-particle score finds junk without losing a rare state, against a simulated set's truth.

Scores follow ``cryohetFitZ``'s sign: higher is worse. ``junk`` is the truth of ``benchmark-make --dataset junk``
(0 a real particle, k > 0 the junk kind ``JUNK_KINDS[k - 1]``), ``state`` each particle's true state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def roc_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher for ``positive``: P(pos > neg) + ½ P(tie)
    (the Mann-Whitney U over the product of the group sizes)."""
    neg, pos = np.asarray(negative, dtype=np.float64), np.asarray(positive, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("both groups need at least one score")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


@dataclass
class OutlierReport:
    """Junk against good particles (AUC per junk kind and all together) and where the rare state lands."""

    auc: dict[str, float]          # kind -> AUC of junk of that kind against the good particles; "all": any junk
    median: dict[str, float]       # group -> median score ("good", "rare", each junk kind)
    rare_rank: float               # the rare state's median rank from the worst, a fraction of all (0: worst)
    good_mean: float
    good_sd: float


def outlier_report(score: np.ndarray, junk: np.ndarray, state: np.ndarray, rare_state: int,
                   kinds: tuple[str, ...]) -> OutlierReport:
    """Compare ``score`` (N,) with the truth: good = real particles of the other states, rare = real particles of
    ``rare_state``, junk kind k = rows with ``junk == k`` (named ``kinds[k - 1]``)."""
    score, junk, state = np.asarray(score, dtype=np.float64), np.asarray(junk), np.asarray(state)
    good = (junk == 0) & (state != rare_state)
    rare = (junk == 0) & (state == rare_state)
    auc = {name: roc_auc(score[good], score[junk == k + 1]) for k, name in enumerate(kinds) if (junk == k + 1).any()}
    auc["all"] = roc_auc(score[good], score[junk > 0])
    median = {"good": float(np.median(score[good])), "rare": float(np.median(score[rare])) if rare.any() else np.nan}
    median |= {name: float(np.median(score[junk == k + 1])) for k, name in enumerate(kinds) if (junk == k + 1).any()}
    from_worst = (len(score) - rankdata(score)) / len(score)  # 0 for the worst particle
    rare_rank = float(np.median(from_worst[rare])) if rare.any() else np.nan
    return OutlierReport(auc, median, rare_rank, float(score[good].mean()), float(score[good].std()))
