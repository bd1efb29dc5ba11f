"""When a column is NaN by definition: the conditions pipeline.core.columns names in `nan_when`.

`nan_allowed(frame)` gives, for every column that may be NaN, a boolean Series over the rows of a per-layer
or per-feature table saying where it may be. `intervene` refuses a table with any other NaN (or an
infinity) before writing it, and `aggregate` counts them across the study for the report's sanity section:
one rule, applied by the two stages that own the tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.columns import NAN_WHEN
from pipeline.stats.resampling import MIN_INTERVAL_DOCS


def _conditions(frame) -> dict[str, Callable[[], Any]]:
    import pandas as pd

    def col(name, default=float("nan")):
        return frame[name] if name in frame else pd.Series(default, index=frame.index)

    no_live = col("n_live", 0) == 0
    no_ctrl = col("ctrl_kl").isna()
    no_ctx = col("sae_context_size").isna()
    # the random-direction comparison needs a positive KL for the feature and every draw, and two draws for a spread
    no_ratio = no_ctrl | no_live | ~(col("ctrl_kl_live_min") > 0) | ~(col("kl_live") > 0)
    no_spread = no_ratio | ~(col("ctrl_draws", 0) >= 2)
    return {
        "no_live": lambda: no_live,  # no live position: live means are undefined, never 0
        "few_docs": lambda: ~(col("n_docs", 0) >= MIN_INTERVAL_DOCS),  # intervals need MIN_INTERVAL_DOCS documents
        "few_live_docs": lambda: ~(col("n_docs_live", 0) >= MIN_INTERVAL_DOCS) | no_live,
        "no_ctrl": lambda: no_ctrl,  # control_draws 0
        "no_ctrl_live": lambda: no_ctrl | no_live,
        "no_ratio": lambda: no_ratio,
        "no_spread": lambda: no_spread,
        "no_random_test": lambda: no_spread | ~(col("ctrl_log_kl_live_sd") > 0),
        "no_ctx": lambda: no_ctx,  # the SAE records no training context
        "no_ctx_live": lambda: no_ctx | no_live,
        "none_in_ctx": lambda: no_live | no_ctx | (col("frac_live_beyond_ctx") == 1),
    }


def nan_allowed(frame) -> dict[str, Any]:
    """column -> boolean Series over `frame`'s rows: where that column is NaN by definition."""
    conditions = _conditions(frame)
    unknown = set(NAN_WHEN.values()) - set(conditions)
    if unknown:
        raise ValueError(f"pipeline.core.columns names NaN conditions with no rule: {sorted(unknown)}")
    cache: dict[str, Any] = {}
    out = {}
    for column, name in NAN_WHEN.items():
        if name not in cache:
            cache[name] = conditions[name]()
        out[column] = cache[name]
    return out
