"""Resampling by document, the sign-flip test and Holm's adjustment: exactness on small cases and the
error rate over many simulated studies with no effect."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.corpus import heading_starts, window_documents
from pipeline.engine.resampling import Resampler, holm


def test_documents_are_the_sampling_unit_not_passages():
    rs = Resampler.for_passages([7, 7, 9, 12, 12, 12], seed=1, stream=0)
    assert rs.n_docs == 3 and rs.doc_index.tolist() == [0, 0, 1, 2, 2, 2]
    values = np.arange(12.0).reshape(6, 2)
    sums, counts = rs.doc_sums(values)
    assert sums.tolist() == [0 + 1 + 2 + 3, 4 + 5, 6 + 7 + 8 + 9 + 10 + 11] and counts.tolist() == [4, 2, 6]
    mask = values > 8
    sums, counts = rs.doc_sums(values, mask)
    assert sums.tolist() == [0, 0, 9 + 10 + 11] and counts.tolist() == [0, 0, 3]


def test_the_exact_sign_flip_p_value_counts_every_sign_vector():
    rs = Resampler.for_passages(list(range(5)), seed=0, stream=0)
    sums, counts = np.array([3.0, -1.0, 2.0, 0.5, 1.5]), np.ones(5)
    p, min_p = rs.sign_flip(sums, counts)
    observed = abs(sums.sum())
    hits = sum(abs(np.dot(e, sums)) >= observed for e in itertools.product([-1, 1], repeat=5))
    assert p == hits / 32 and min_p == 2 / 32
    # documents without a position take no part: the same p with an empty one added
    rs6 = Resampler.for_passages(list(range(6)), seed=0, stream=0)
    assert rs6.sign_flip(np.append(sums, 0.0), np.append(counts, 0.0)) == (p, min_p)
    assert math.isnan(rs.sign_flip(np.zeros(5), np.zeros(5))[0])


def test_a_feature_in_few_documents_cannot_reach_a_small_p():
    rs = Resampler.for_passages(list(range(40)), seed=0, stream=0)
    sums, counts = np.zeros(40), np.zeros(40)
    sums[:3], counts[:3] = 5.0, 10  # a large, consistent effect, but in 3 documents only
    p, min_p = rs.sign_flip(sums, counts)
    assert p == min_p == 2 / 8


def test_the_bootstrap_interval_covers_the_estimate_and_widens_with_spread():
    rs = Resampler.for_passages(list(range(30)), seed=3, stream=1)
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 20, 30).astype(float)
    tight = counts * (1.0 + 0.01 * rng.standard_normal(30))
    wide = counts * (1.0 + 0.5 * rng.standard_normal(30))
    se_t, lo_t, hi_t = rs.interval(tight, counts)
    se_w, lo_w, hi_w = rs.interval(wide, counts)
    assert lo_t <= tight.sum() / counts.sum() <= hi_t and lo_w <= wide.sum() / counts.sum() <= hi_w
    assert 0 < se_t < se_w and hi_t - lo_t < hi_w - lo_w
    assert all(math.isnan(x) for x in rs.interval(np.array([1.0] + [0] * 29), np.array([3.0] + [0] * 29)))


def test_holm_matches_the_step_down_definition():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
    adj = holm(p)
    # sorted finite: 0.01, 0.03, 0.04, 0.2 with m = 4: 0.04, 0.09, 0.09 (monotone), 0.2
    assert adj[0] == pytest.approx(0.04) and adj[3] == pytest.approx(0.09) and adj[1] == pytest.approx(0.09)
    assert adj[4] == pytest.approx(0.2) and math.isnan(adj[2])


def _study(rng, seed, n_tests, n_docs, shift=0.0):
    """Per-document sums of n_tests dependent tests (a shared document factor) with heterogeneous counts."""
    counts = rng.integers(1, 30, n_docs).astype(float)
    shared = rng.standard_normal(n_docs) * np.sqrt(counts)
    rs = Resampler.for_passages(list(range(n_docs)), seed=seed, stream=0, n_boot=10, n_flips=2000)
    p = []
    for _ in range(n_tests):
        noise = 0.7 * shared * rng.uniform(0.5, 1.5) + rng.standard_normal(n_docs) * np.sqrt(counts)
        p.append(rs.sign_flip(noise + shift * counts, counts)[0])
    return np.array(p)


@pytest.mark.parametrize("n_docs", [10, 40])  # exact enumeration, and random sign vectors
def test_under_no_effect_holm_flags_at_most_the_nominal_share_of_studies(n_docs):
    rng = np.random.default_rng(n_docs)
    n_studies, n_tests = 300, 8
    raw_any = adjusted_any = 0
    for s in range(n_studies):
        p = _study(rng, s, n_tests, n_docs)
        raw_any += bool((p <= 0.05).any())
        adjusted_any += bool((holm(p) <= 0.05).any())
    fwer = adjusted_any / n_studies
    assert fwer <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / n_studies)  # nominal, with Monte Carlo slack
    assert raw_any / n_studies > 0.15  # the simulation bites: unadjusted, many studies find "effects"


def test_a_real_effect_is_found_after_adjustment():
    rng = np.random.default_rng(5)
    found = sum(bool((holm(_study(rng, s, 8, 40, shift=0.5)) <= 0.05).all()) for s in range(20))
    assert found >= 18


def test_passages_get_the_document_holding_most_of_their_tokens():
    text = " = A = \n" + "a" * 19 + "\n = B = \n" + "b" * 40 + "\n"
    starts = heading_starts(text)
    assert starts == (0, 28)
    token_starts = np.arange(len(text))  # one token per character
    docs = window_documents(token_starts, starts, n_windows=len(text) // 9, max_len=10)
    # window w covers characters 9w..9w+8: the third (18..26) is all A, the fourth (27..35) mostly B
    assert docs.tolist()[:4] == [0, 0, 0, 1] and docs[-1] == 1


def test_wikitext_sections_are_not_articles():
    text = " = Valkyria = \n intro\n = = Gameplay = = \n more\n = Tower = \n x\n"
    assert [text[i:i + 12] for i in heading_starts(text)] == [" = Valkyria ", " = Tower = \n"]
