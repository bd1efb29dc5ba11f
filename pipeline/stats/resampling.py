"""Uncertainty that respects the corpus: resampling by document, and Holm's adjustment across the study.

The method is defined in docs/statistics.md; this module is its code. Passages cut from one WikiText
article (or one toy document) are not independent, so every interval and p-value here treats the document
as the unit: a metric over positions is the ratio R = sum_d S_d / sum_d n_d of per-document sums S_d of the
values and counts n_d of the positions it averages over, over the k documents that have such positions.

- Intervals: a symmetric studentized (bootstrap-t) interval of R over the k documents with data. Its
  standard error is the ratio estimator's linearised one, se = sqrt(k / (k - 1) * sum_d (S_d - R n_d)^2) /
  sum_d n_d; each of `n_boot` seeded resamples of the k documents gives t* = (R* - R) / se*, and the 95%
  interval is R +- q se with q the 95th percentile of |t*|. It is reported from `MIN_INTERVAL_DOCS`
  documents up (NaN below): tests/stats/test_resampling.py's coverage simulation (5-60 documents, Gaussian and
  skewed effects, rare and dense features) shows >= 93% coverage from there.
- p-values: a sign-flip randomisation test by document. Its null hypothesis is that each document's sum
  S_d is symmetric about zero (as likely to be -s as +s; documents independent), which is what the test
  is exact for, whatever the shape of the effects; it is not a test that the mean is zero (a skewed change
  whose mean is zero can be rejected, and the test's own simulation shows by how much). The observed
  |sum_d S_d| is ranked among |sum_d e_d S_d| over sign vectors e: every sign vector for up to
  `EXACT_MAX_DOCS` documents with data (then p >= 2 / 2^k exactly), else `n_flips` seeded random ones,
  p = (1 + hits) / (1 + n_flips) >= 1 / (1 + n_flips). `min_p` is that floor: a feature present in few
  documents cannot reach a small p at all, whatever its effect.
- `holm`: Holm's step-down adjustment, which controls the family-wise error rate under any dependence
  between the tests (the study's tests share documents and are dependent); `holm_reachable` says which
  rows no outcome of their own test could make significant, given the study's other p-values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FWER = 0.05  # the family-wise error rate each family of the study's verdicts holds to (aggregate's Holm adjustment)
N_FAMILIES = 2  # the loss test and the random-direction comparison: study-wide, up to N_FAMILIES * FWER
EXACT_MAX_DOCS = 14  # 2^14 = 16,384 sign vectors
N_FLIPS = 16384
N_BOOT = 2000
MIN_INTERVAL_DOCS = 5  # fewest documents with data for an interval (coverage simulation, tests/stats/test_resampling.py)


@dataclass(frozen=True)
class Resampler:
    """The documents of a layer's passages and the resamples every row of the layer shares."""

    doc_index: np.ndarray  # int [N]: passage -> document 0..D-1 (dense)
    n_docs: int
    flips: np.ndarray  # float64 [n_flips, D]: random signs
    seed: int = 0
    stream: int = 0
    n_boot: int = N_BOOT
    _boot: dict = field(default_factory=dict, repr=False, compare=False)  # k -> float64 [n_boot, k] draw counts

    @classmethod
    def for_passages(cls, passage_documents: list[int] | np.ndarray, seed: int, stream: int,
                     n_boot: int = N_BOOT, n_flips: int = N_FLIPS) -> Resampler:
        """`stream` (the layer) keeps layers' resamples apart; everything is seeded, so reruns agree."""
        _, doc_index = np.unique(np.asarray(passage_documents), return_inverse=True)
        n_docs = int(doc_index.max()) + 1 if len(doc_index) else 0
        rng = np.random.default_rng([seed, stream, 0x5eed])
        flips = rng.choice(np.array([-1.0, 1.0]), size=(n_flips, n_docs))
        return cls(doc_index=doc_index, n_docs=n_docs, flips=flips, seed=seed, stream=stream, n_boot=n_boot)

    def boot_weights(self, k: int) -> np.ndarray:
        """float64 [n_boot, k]: how often each of k documents is drawn in each resample; seeded by (seed,
        stream, k), so every row of a layer with data in k documents shares the same resamples."""
        if k not in self._boot:
            rng = np.random.default_rng([self.seed, self.stream, 0xb007, k])
            self._boot[k] = rng.multinomial(k, np.full(k, 1.0 / k), size=self.n_boot).astype(np.float64)
        return self._boot[k]

    def doc_sums(self, values: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-document sums of `values` [N, S] over `mask` (all positions when None), and position counts."""
        if mask is None:
            per_passage, counts = values.sum(axis=1), np.full(values.shape[0], values.shape[1], dtype=np.float64)
        else:
            per_passage, counts = np.where(mask, values, 0.0).sum(axis=1), mask.sum(axis=1).astype(np.float64)
        sums, n = np.zeros(self.n_docs), np.zeros(self.n_docs)
        np.add.at(sums, self.doc_index, per_passage)
        np.add.at(n, self.doc_index, counts)
        return sums, n

    def interval(self, sums: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
        """(standard error, 2.5%, 97.5% bound) of sum(S) / sum(n): the bootstrap-t interval over the documents
        with data (counts > 0), NaN with fewer than MIN_INTERVAL_DOCS of them."""
        return studentized_interval(sums, counts, self.boot_weights)

    def sign_flip(self, sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
        """(p, min_p) of the two-sided sign-flip test over the documents with positions: null, each document's
        sum is symmetric about 0."""
        has = counts > 0
        s = sums[has]
        k = len(s)
        if k == 0:
            return math.nan, math.nan
        if k <= EXACT_MAX_DOCS:
            patterns = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1) * 2.0 - 1.0  # row 2^k - 1: all +1
            stats = np.abs(patterns @ s)
            observed = stats[-1]
            hits = int((stats >= observed * (1 - 1e-12)).sum())
            return hits / 2 ** k, 2.0 / 2 ** k
        observed = abs(float(np.ones(k) @ s))
        stats = np.abs(self.flips[:, has] @ s)
        hits = int((stats >= observed * (1 - 1e-12)).sum())
        return (1 + hits) / (1 + len(stats)), 1.0 / (1 + len(stats))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and is not counted as a test)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def ratio_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """(R, se): the ratio sum(S) / sum(n) over k >= 2 documents and its linearised standard error."""
    k, total = len(sums), counts.sum()
    ratio = sums.sum() / total
    return float(ratio), float(math.sqrt(k / (k - 1) * float(((sums - ratio * counts) ** 2).sum())) / total)


def studentized_interval(sums: np.ndarray, counts: np.ndarray, weights_for=None, n_boot: int = N_BOOT,
                         seed: int = 0) -> tuple[float, float, float]:
    """(se, lo, hi): the symmetric 95% bootstrap-t interval of sum(S) / sum(n) over the documents with counts > 0.
    `weights_for(k)` gives the [n_boot, k] resample counts (Resampler.boot_weights); by default seeded ones."""
    has = counts > 0
    s, n = np.asarray(sums, dtype=np.float64)[has], np.asarray(counts, dtype=np.float64)[has]
    k = len(s)
    if k < MIN_INTERVAL_DOCS:
        return math.nan, math.nan, math.nan
    if weights_for is None:
        rng = np.random.default_rng([seed, 0xb007, k])
        w = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)
    else:
        w = weights_for(k)
    ratio, se, q = bootstrap_t(s[None, :], n[None, :], w)
    return float(se[0]), float(ratio[0] - q[0] * se[0]), float(ratio[0] + q[0] * se[0])


def bootstrap_t(sums: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For R rows of k documents each (`sums`, `counts` [R, k], every count > 0) and resample counts `weights`
    [B, k]: the ratios, their linearised standard errors, and q, the 95th percentile of |t*| over the resamples
    (the interval is ratio +- q se; a row whose documents all share one ratio has se 0 and q 0)."""
    k = sums.shape[1]
    total = counts.sum(axis=1)
    ratio = sums.sum(axis=1) / total
    se = np.sqrt(k / (k - 1) * ((sums - ratio[:, None] * counts) ** 2).sum(axis=1)) / total
    den = counts @ weights.T  # [R, B]
    r_star = (sums @ weights.T) / den
    q = np.zeros(len(ratio))
    step = max(1, 4_000_000 // (weights.shape[0] * k))  # rows per chunk: at most ~4M elements of [rows, B, k]
    for start in range(0, len(ratio), step):
        rows = slice(start, start + step)
        resid = sums[rows, None, :] - r_star[rows, :, None] * counts[rows, None, :]
        se_star = np.sqrt(k / (k - 1) * np.einsum("bk,rbk->rb", weights, resid ** 2)) / den[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_star = np.abs(r_star[rows] - ratio[rows, None]) / se_star
        # se* = 0 only when a resample draws documents that all share one ratio (one document k times): left out
        t_star = np.where(np.isfinite(t_star), t_star, np.nan)
        enough = np.isfinite(t_star).sum(axis=1) > 0
        if enough.any():
            q_rows = np.zeros(t_star.shape[0])
            q_rows[enough] = np.nanpercentile(t_star[enough], 95.0, axis=1)
            q[rows] = q_rows
    q = np.where(se > 0, q, 0.0)
    return ratio, se, q


def holm_reachable(p_values: np.ndarray, min_p: np.ndarray, fwer: float = FWER) -> np.ndarray:
    """Which tests some outcome of their own could make significant: a row is reachable when it is
    significant, or when its p-value set to its smallest possible one (`min_p`), every other p-value as
    observed, would pass Holm at `fwer`. NaN p-values are no test (False)."""
    p = np.asarray(p_values, dtype=np.float64)
    floor = np.asarray(min_p, dtype=np.float64)
    adjusted = holm(p)
    out = np.zeros(p.shape, dtype=bool)
    for i in np.flatnonzero(np.isfinite(p)):
        if adjusted[i] <= fwer:
            out[i] = True
            continue
        trial = p.copy()
        trial[i] = min(floor[i], p[i]) if np.isfinite(floor[i]) else p[i]
        out[i] = bool(holm(trial)[i] <= fwer)
    return out
