"""Per-row statistics beyond the means: intervals and tests by document, the random control, dose and context.

For one (feature, value) row of a layer (arrays over the scored positions [N, S], column j = position
t = j + 1), `row_statistics` returns the columns the intervene stage adds to pipeline.engine.metrics's
(each declared in pipeline.core.columns):

- `*_se`, `*_lo`, `*_hi` for delta_ce, kl, delta_ce_live, kl_live: document-bootstrap standard error and
  95% interval (pipeline.stats.resampling);
- `p_delta_ce_live`, `min_p_delta_ce_live`: sign-flip test by document of "each document's summed change of CE
  over live positions is symmetric about 0"; `n_docs`, `n_docs_live`, `n_passages_live`, `n_docs_firing`,
  `n_passages_firing`;
- controls: the means over the random draws `ctrl_delta_ce`, `ctrl_kl`, `ctrl_delta_ce_live`, `ctrl_kl_live`,
  the draws' range `ctrl_kl_live_min`, `ctrl_kl_live_max`, and the comparison of pipeline.stats.random_directions
  (`kl_ratio_random`, `p_vs_random`, `ctrl_log_kl_live_sd`, `ctrl_draws_above`);
- dose: `dose_rel_norm`, the mean over live positions of ||delta_t|| / ||x_t|| (delta_t = c_t s_t d_i, s_t the
  SAE's per-position scale, 1 unless it normalises its input), and `push_max_act`, the mean over live positions
  of the push c_t along the decoder direction, in the SAE's own units: the feature's max activation on the corpus;
- context: `sae_context_size` (the SAE's training context), `frac_live_beyond_ctx` (share of live positions
  at t >= it), `delta_ce_live_in_ctx` and `kl_live_in_ctx` (the live means over t < it only).
Every column is NaN where it is undefined (no live position, fewer than two documents, controls off,
fewer than 2 draws or a zero control KL); none is ever a made-up 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.core.columns import NAN_WHEN
from pipeline.engine.metrics import masked_mean
from pipeline.stats.random_directions import compare_to_random
from pipeline.stats.resampling import Resampler

# the columns that are NaN when a row has no control draws (their NaN condition implies no controls)
CONTROL_COLUMNS = tuple(column for column, condition in NAN_WHEN.items()
                        if condition in ("no_ctrl", "no_ctrl_live", "no_ratio", "no_spread", "no_random_test"))


def row_statistics(rs: Resampler, *, ce_clean: np.ndarray, ce_int: np.ndarray, kl: np.ndarray, live: np.ndarray,
                  acts: np.ndarray, ctrl_ce_int: np.ndarray | None, ctrl_kl: np.ndarray | None,
                  coef: np.ndarray, dir_norm: float, resid_norm: np.ndarray, max_act: float,
                  context_size: int | None, scale: np.ndarray | None = None) -> dict[str, Any]:
    """Columns of one row. `live` bool [N, S]; `acts` the feature's clean activations [N, S]; `ctrl_*`
    [draws, N, S] or None; `coef` [N, S] the push c_t along the decoder row; `resid_norm` [N, S] ||x_t||;
    `scale` [N, S] the SAE's s_t (None: 1)."""
    delta = ce_int - ce_clean
    out: dict[str, Any] = {"n_docs": rs.n_docs}
    for name, values, mask in (("delta_ce", delta, None), ("kl", kl, None),
                               ("delta_ce_live", delta, live), ("kl_live", kl, live)):
        se, lo, hi = rs.interval(*rs.doc_sums(values, mask))
        out.update({f"{name}_se": se, f"{name}_lo": lo, f"{name}_hi": hi})
    live_sums, live_counts = rs.doc_sums(delta, live)
    out["p_delta_ce_live"], out["min_p_delta_ce_live"] = rs.sign_flip(live_sums, live_counts)
    out["n_docs_live"] = int((live_counts > 0).sum())
    out["n_passages_live"] = int(live.any(axis=1).sum())
    firing = acts != 0
    out["n_passages_firing"] = int(firing.any(axis=1).sum())
    out["n_docs_firing"] = int(len(np.unique(rs.doc_index[firing.any(axis=1)])))

    out["ctrl_draws"] = 0 if ctrl_kl is None else int(ctrl_kl.shape[0])
    if ctrl_kl is not None and ctrl_kl.shape[0] > 0:
        c_delta, c_kl = ctrl_ce_int.mean(axis=0) - ce_clean, ctrl_kl.mean(axis=0)
        out["ctrl_delta_ce"], out["ctrl_kl"] = float(c_delta.mean()), float(c_kl.mean())
        out["ctrl_delta_ce_live"], out["ctrl_kl_live"] = masked_mean(c_delta, live), masked_mean(c_kl, live)
        per_draw = np.array([masked_mean(draw, live) for draw in ctrl_kl])
        live_any = bool(live.any())
        out["ctrl_kl_live_min"] = float(per_draw.min()) if live_any else math.nan
        out["ctrl_kl_live_max"] = float(per_draw.max()) if live_any else math.nan
        out.update(compare_to_random(masked_mean(kl, live), per_draw) if live_any else
                   {k: math.nan for k in ("ctrl_log_kl_live_sd", "ctrl_draws_above", "kl_ratio_random", "p_vs_random")})
    else:
        out.update({key: math.nan for key in CONTROL_COLUMNS})

    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(coef) * dir_norm / resid_norm if scale is None else np.abs(coef) * scale * dir_norm / resid_norm
    out["dose_rel_norm"] = masked_mean(rel, live)
    out["push_max_act"] = masked_mean(coef, live) / max_act if max_act > 0 else math.nan

    out["sae_context_size"] = context_size if context_size is not None else math.nan
    positions = np.arange(1, live.shape[1] + 1)[None, :]
    if context_size is None:
        out.update(frac_live_beyond_ctx=math.nan, delta_ce_live_in_ctx=math.nan, kl_live_in_ctx=math.nan)
    else:
        within = live & (positions < context_size)
        n_live = int(live.sum())
        out["frac_live_beyond_ctx"] = (n_live - int(within.sum())) / n_live if n_live else math.nan
        out["delta_ce_live_in_ctx"] = masked_mean(delta, within)
        out["kl_live_in_ctx"] = masked_mean(kl, within)
    return out
