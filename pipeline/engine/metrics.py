"""The study's metrics, from per-position arrays (docs/method.md's definitions, in float64).

Tokens X [N, T] with X[:, 0] = BOS; logits at position t predict X[:, t+1]. The scored positions
are t = 1 .. T-2 (S = T - 2 of them per passage): position 0's input is BOS and position T-1 has
no next token. Every array here is [N, S] over those positions, column j holding t = j + 1.

- ce = -log softmax(logits)[X[n, t+1]];  delta_ce = mean(ce_int) - mean(ce_clean)
- kl = sum_v p_clean (log p_clean - log p_int), nats, averaged over scored positions
- a feature fires where a_i(x_t) != 0 (AbsTopK-style SAEs fire negatively too); `density` is the
  fraction of scored positions where it fires, `max_activation` its largest |a_i|
- live positions: scored (n, t) with |a_i(x_t)| > max(0, q), q the `live_percentile`-th percentile
  (numpy's linear interpolation) of |a_i| over all scored positions; for non-negative activations
  (ReLU, JumpReLU, TopK) that is a_i > max(0, q), q of a_i, bit for bit; live means are NaN when no
  position is live, never 0
Uncertainty (by document, not passage) is pipeline.stats.rows's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LiveSet:
    threshold: float  # max(0, q), q the percentile of |a|
    mask: np.ndarray  # bool [N, S]


def live_positions(acts_scored: np.ndarray, percentile: float) -> LiveSet:
    """Live positions of one feature from its activations at the scored positions [N, S]: where its
    magnitude |a| is above max(0, the percentile of |a|), so negative firings count."""
    magnitude = np.abs(acts_scored)
    q = float(np.percentile(magnitude.astype(np.float64), percentile))
    threshold = max(0.0, q)
    return LiveSet(threshold=threshold, mask=magnitude > threshold)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def variant_metrics(ce_clean: np.ndarray, ce_int: np.ndarray, kl: np.ndarray,
                    acts_scored: np.ndarray, live: LiveSet) -> dict[str, float]:
    """Every scalar metric of one (feature, value) variant from [N, S] arrays."""
    ce_clean = ce_clean.astype(np.float64)
    ce_int = ce_int.astype(np.float64)
    kl = kl.astype(np.float64)
    delta = ce_int - ce_clean
    n_scored = delta.size
    n_live = int(live.mask.sum())
    return {
        "n_passages": int(delta.shape[0]),
        "n_scored": int(n_scored),
        "ce_clean": float(ce_clean.mean()),
        "ce_int": float(ce_int.mean()),
        "delta_ce": float(delta.mean()),
        "kl": float(kl.mean()),
        "live_threshold": live.threshold,
        "n_live": n_live,
        "frac_live": n_live / n_scored if n_scored else math.nan,
        "mean_act_live": masked_mean(acts_scored.astype(np.float64), live.mask),
        "delta_ce_live": masked_mean(delta, live.mask),
        "kl_live": masked_mean(kl, live.mask),
    }


def density(acts_scored: np.ndarray) -> float:
    """Fraction of scored positions where the feature fires (a != 0)."""
    return float((acts_scored != 0).mean()) if acts_scored.size else math.nan


def max_activation(acts_scored: np.ndarray) -> float:
    """The feature's largest activation magnitude |a| over the scored positions (its max for a >= 0)."""
    return float(np.abs(acts_scored).max()) if acts_scored.size else math.nan


def top_tokens(mean_delta: np.ndarray, k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(promoted, suppressed): the k largest and k smallest entries as (token id, value).

    Ties are broken by token id so the choice is reproducible.
    """
    k = min(k, mean_delta.shape[0])
    order = np.lexsort((np.arange(mean_delta.shape[0]), -mean_delta))
    promoted = [(int(i), float(mean_delta[i])) for i in order[:k]]
    order_low = np.lexsort((np.arange(mean_delta.shape[0]), mean_delta))
    suppressed = [(int(i), float(mean_delta[i])) for i in order_low[:k]]
    return promoted, suppressed
