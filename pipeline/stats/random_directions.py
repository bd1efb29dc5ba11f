"""Is the feature's direction unlike a random one? The comparison of a feature's live KL with its random-direction
controls' (docs/statistics.md, "Random directions").

The engine pushes each (feature, value) row's own positions by the same per-position norm along K seeded random
unit directions (pipeline.engine.controls). The null hypothesis is exchangeability: the feature's decoder
direction is one more random direction of that norm, so its live KL is one more draw from the distribution of
random directions' live KLs on this corpus. The comparison is on the log scale (KL > 0; ratios are what a
reader compares), as a prediction test with the spread estimated from the draws themselves:

    t = (log KL_f - mean_r log KL_r) / (s * sqrt(1 + 1/K)),   s = sd_r(log KL_r),   t ~ Student t, K - 1 df

exact when log KL over random directions is normal, and it accounts for the spread between directions (the
documents are shared by the feature and every draw, so document-to-document variation does not enter twice).
With K draws there is no floor on p, but large |t| is needed: to pass Holm's first threshold FWER / m the
feature must lie `required_spreads(K, m)` spreads of the draws from their mean. K = 1 gives the ratio, no test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import stdtr, stdtrit


def compare_to_random(feature_kl: float, control_kls: np.ndarray) -> dict[str, Any]:
    """The columns of one row: `kl_ratio_random` (the feature's live KL over the draws' geometric mean),
    `p_vs_random` (two-sided), `ctrl_log_kl_live_sd` (the draws' spread of log live KL) and
    `ctrl_draws_above` (how many draws moved the model at least as much as the feature). NaN where a KL is
    not positive (nothing was pushed) or the draws cannot estimate a spread."""
    ctrl = np.asarray(control_kls, dtype=np.float64)
    out = {"kl_ratio_random": math.nan, "p_vs_random": math.nan, "ctrl_log_kl_live_sd": math.nan,
           "ctrl_draws_above": int((ctrl >= feature_kl).sum()) if math.isfinite(feature_kl) else math.nan}
    if not (math.isfinite(feature_kl) and feature_kl > 0 and len(ctrl) and np.all(ctrl > 0)):
        return out
    logs = np.log(ctrl)
    gap = math.log(feature_kl) - float(logs.mean())
    out["kl_ratio_random"] = math.exp(gap)
    k = len(logs)
    if k < 2:
        return out
    sd = float(logs.std(ddof=1))
    out["ctrl_log_kl_live_sd"] = sd
    if sd > 0:
        t = gap / (sd * math.sqrt(1.0 + 1.0 / k))
        out["p_vs_random"] = float(min(1.0, 2.0 * stdtr(k - 1, -abs(t))))
    return out


def required_spreads(n_draws: int, n_tests: int, fwer: float) -> float:
    """How many draw spreads (s * sqrt(1 + 1/K)) from the draws' mean log KL a feature must lie to pass Holm's
    first threshold fwer / n_tests, two-sided; NaN with fewer than 2 draws."""
    if n_draws < 2 or n_tests < 1:
        return math.nan
    return float(stdtrit(n_draws - 1, 1.0 - fwer / n_tests / 2.0))
