"""Uncertainty that respects the corpus: resampling by document, and Holm's adjustment across the study.

Passages cut from one WikiText article (or one toy document) are not independent, so every interval and
p-value here treats the document as the unit: a metric over positions is the ratio sum_d S_d / sum_d n_d
of per-document sums S_d of the values and counts n_d of the positions it averages over.

- Intervals: a document bootstrap of that ratio (`n_boot` resamples of the documents with replacement,
  the same resamples for every row of a layer); the 95% interval is the 2.5th and 97.5th percentiles and
  the standard error the resamples' standard deviation. Resamples that draw no position of the metric
  are left out; with fewer than 2 documents there is no interval (NaN).
- p-values: a sign-flip randomisation test of "the mean is 0" by document: under the null each
  document's sum S_d is as likely to be -S_d (symmetric, independent documents), so the observed
  |sum_d S_d| is ranked among |sum_d e_d S_d| over sign vectors e. Exact (every sign vector) for up
  to `EXACT_MAX_DOCS` documents with data, else `n_flips` seeded random ones (p = (1 + hits) / (1 + n_flips)).
  `min_p` is the smallest p the test can give with that many documents: 2 / 2^k exactly, 1 / (1 + n_flips)
  otherwise. A feature present in few documents cannot reach a small p at all, whatever its effect.
- `holm`: Holm's step-down adjustment, which controls the family-wise error rate under any dependence
  between the tests (the study's tests share documents and are dependent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FWER = 0.05  # the family-wise error rate the study's verdicts hold to (aggregate's Holm adjustment, the report)
EXACT_MAX_DOCS = 14  # 2^14 = 16,384 sign vectors
N_FLIPS = 16384
N_BOOT = 2000


@dataclass(frozen=True)
class Resampler:
    """The documents of a layer's passages and the resamples every row of the layer shares."""

    doc_index: np.ndarray  # int [N]: passage -> document 0..D-1 (dense)
    n_docs: int
    boot_weights: np.ndarray  # float64 [n_boot, D]: how often each document is drawn
    flips: np.ndarray  # float64 [n_flips, D]: random signs

    @classmethod
    def for_passages(cls, passage_documents: list[int] | np.ndarray, seed: int, stream: int,
                     n_boot: int = N_BOOT, n_flips: int = N_FLIPS) -> Resampler:
        """`stream` (the layer) keeps layers' resamples apart; everything is seeded, so reruns agree."""
        _, doc_index = np.unique(np.asarray(passage_documents), return_inverse=True)
        n_docs = int(doc_index.max()) + 1 if len(doc_index) else 0
        rng = np.random.default_rng([seed, stream, 0x5eed])
        boot = rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n_boot).astype(np.float64) if n_docs \
            else np.zeros((n_boot, 0))
        flips = rng.choice(np.array([-1.0, 1.0]), size=(n_flips, n_docs))
        return cls(doc_index=doc_index, n_docs=n_docs, boot_weights=boot, flips=flips)

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
        """(standard error, 2.5th, 97.5th percentile) of sum(S) / sum(n) over document resamples."""
        if int((counts > 0).sum()) < 2:
            return math.nan, math.nan, math.nan
        num, den = self.boot_weights @ sums, self.boot_weights @ counts
        ok = den > 0
        if ok.sum() < len(den) / 2:
            return math.nan, math.nan, math.nan
        theta = num[ok] / den[ok]
        lo, hi = np.percentile(theta, [2.5, 97.5])
        return float(theta.std(ddof=1)), float(lo), float(hi)

    def sign_flip(self, sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
        """(p, min_p) of the two-sided sign-flip test of mean 0 over the documents with positions."""
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
