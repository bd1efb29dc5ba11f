"""The agreement of the attribution screen's estimate with the exact delta_ce, per (layer, alpha).

`agreement` reduces pipeline.engine.screen_check.verify_layer's rows per (layer, alpha, estimator, subset),
subset "random" (the seeded sample: what a feature picked at random from the dictionary looks like) and "all"
(top and sample together, the extremes included):

- `spearman` with a 95% interval (Fisher z, Bonett-Wright standard error sqrt((1 + r^2 / 2) / (n - 3))),
  and `pearson`, of estimate and exact delta_ce;
- `spearman_per_firing`: the same on the density-free reading, estimate and exact each times
  N * S / n_firing. Both the estimate and the exact delta_ce scale with how often a feature fires, so the
  plain correlation is partly density agreeing with itself; this one is not;
- `sign_agreement`: share of features whose estimate and exact delta_ce have the same sign;
- `top_overlap` of `top_n`: how many of the subset's top_n features by |estimate| are among its top_n by
  |exact delta_ce| (the exact ranking of the whole dictionary is unknown, so "top" is within the subset);
- `median_abs_rel_error`: the median of |estimate - exact| / |exact| (features with exact != 0).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.core.columns import SCREEN_AGREEMENT_COLUMNS, SCREEN_ESTIMATES

SUBSETS = ("random", "all")


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _median_rel_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    nonzero = exact != 0
    return float(np.median(np.abs(estimate[nonzero] - exact[nonzero]) / np.abs(exact[nonzero]))) if nonzero.any() \
        else math.nan


def spearman_interval(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval of a Spearman correlation with Bonett and Wright's (2000) standard error."""
    if not math.isfinite(r) or n < 4:
        return math.nan, math.nan
    from statistics import NormalDist

    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt((1 + r * r / 2) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def agreement_figures(estimate: np.ndarray, exact: np.ndarray, per_firing_scale: np.ndarray, top_n: int
                      ) -> dict[str, float]:
    """The agreement of one set of features (see the module docstring); `per_firing_scale` is N * S / n_firing."""
    n = len(estimate)
    spearman = _pearson(_ranks(estimate), _ranks(exact))
    lo, hi = spearman_interval(spearman, n)
    k = min(top_n, n)
    top_est = set(np.lexsort((np.arange(n), -np.abs(estimate)))[:k].tolist())
    top_exact = set(np.lexsort((np.arange(n), -np.abs(exact)))[:k].tolist())
    return {
        "n_features": n,
        "spearman": spearman, "spearman_lo": lo, "spearman_hi": hi,
        "pearson": _pearson(estimate, exact),
        "spearman_per_firing": _pearson(_ranks(estimate * per_firing_scale), _ranks(exact * per_firing_scale)),
        "sign_agreement": float(np.mean(np.sign(estimate) == np.sign(exact))) if n else math.nan,
        "top_n": k,
        "top_overlap": len(top_est & top_exact),
        "median_abs_rel_error": _median_rel_error(estimate, exact),
    }


def agreement(rows: pd.DataFrame, n_scored: int, top_n: int, identity: float = 1.0) -> pd.DataFrame:
    """Per (layer, alpha, estimator, subset): the agreement figures of verify_layer's rows (alpha = identity,
    where estimate and exact are both 0, is left out)."""
    estimators = [c for c in SCREEN_ESTIMATES.values() if c in rows and rows[c].notna().any()]
    out = []
    for (layer, alpha), frame in rows[rows["alpha"] != identity].groupby(["layer", "alpha"], sort=True):
        for estimator in estimators:
            for subset in SUBSETS:
                part = frame if subset == "all" else frame[frame["group"] == "random"]
                scale = n_scored / part["n_firing"].to_numpy(dtype=np.float64)
                figures = agreement_figures(part[estimator].to_numpy(), part["exact"].to_numpy(), scale, top_n)
                out.append({"layer": layer, "alpha": alpha, "estimator": estimator, "subset": subset, **figures})
    return pd.DataFrame(out, columns=list(SCREEN_AGREEMENT_COLUMNS))
