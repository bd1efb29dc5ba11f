"""Resampling by document, the sign-flip test, the random-direction comparison and Holm's adjustment
(docs/statistics.md): exactness on small cases, the intervals' coverage, and each test's error rate over many
simulated studies where its null hypothesis is true, with mutation checks that the methods replaced fail."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.core.params.config import parse_params
from pipeline.load.corpus import heading_starts, window_documents
from pipeline.stats.random_directions import compare_to_random, required_spreads
from pipeline.stats.resampling import (
    FWER,
    MIN_INTERVAL_DOCS,
    N_FAMILIES,
    Resampler,
    bootstrap_t,
    holm,
    holm_reachable,
    ratio_se,
    studentized_interval,
)

CONTROL_DRAWS_DEFAULT = parse_params({}).control_draws  # the study's default number of draws


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
    # fewer documents with data than MIN_INTERVAL_DOCS: no interval
    few = np.zeros(30)
    few[:MIN_INTERVAL_DOCS - 1] = 3.0
    assert all(math.isnan(x) for x in rs.interval(few, few))
    assert not any(math.isnan(x) for x in rs.interval(np.r_[np.arange(1.0, MIN_INTERVAL_DOCS + 1), np.zeros(30 - MIN_INTERVAL_DOCS)],
                                                      np.r_[np.ones(MIN_INTERVAL_DOCS), np.zeros(30 - MIN_INTERVAL_DOCS)]))


def test_the_standard_error_is_the_ratio_estimators_linearised_one():
    rng = np.random.default_rng(2)
    sums, counts = rng.standard_normal(9), rng.integers(1, 5, 9).astype(float)
    ratio, se = ratio_se(sums, counts)
    # the delta method by hand: var(R) = k / (k - 1) * sum((S - R n)^2) / (sum n)^2
    by_hand = math.sqrt(9 / 8 * sum((s - ratio * n) ** 2 for s, n in zip(sums, counts, strict=True))) / counts.sum()
    assert ratio == pytest.approx(sums.sum() / counts.sum()) and se == pytest.approx(by_hand)
    # documents whose ratios all agree have no spread: a zero-width interval at the ratio
    assert studentized_interval(2.0 * counts, counts) == (0.0, 2.0, 2.0)


def _documents(rng, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-document sums and counts of a metric whose true ratio is 0: rare features (1-3 live positions per
    document) or dense ones (20-100, with a document effect), Gaussian or skewed (exponential) per position."""
    rare = kind.startswith("rare")
    counts = (rng.integers(1, 4, k) if rare else rng.integers(20, 100, k)).astype(float)
    total = int(counts.sum())
    x = rng.standard_normal(total) if kind.endswith("normal") else rng.exponential(1.0, total) - 1.0
    sums = np.bincount(np.repeat(np.arange(k), counts.astype(int)), weights=x, minlength=k)
    if not rare:
        sums = sums + 0.5 * rng.standard_normal(k) * counts
    return sums, counts


def _document_studies(rng, n: int, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """n studies of k documents each, stacked [n, k]."""
    pairs = [_documents(rng, k, kind) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_the_batched_bootstrap_t_is_the_studys_interval():
    rng = np.random.default_rng(8)
    sums, counts = _document_studies(rng, 3, 7, "rare-skewed")
    w = np.random.default_rng([0, 0xb007, 7]).multinomial(7, np.full(7, 1 / 7), size=500).astype(float)
    ratio, se, q = bootstrap_t(sums, counts, w)
    for i in range(3):
        assert studentized_interval(sums[i], counts[i], n_boot=500) == pytest.approx(
            (se[i], ratio[i] - q[i] * se[i], ratio[i] + q[i] * se[i]), rel=1e-12)


COVERAGE_SIMS = 4000  # per size and kind: a Monte Carlo standard error of 0.0035 on a 95% coverage


@pytest.mark.parametrize("kind", ["rare-normal", "rare-skewed", "dense-skewed"])
def test_reported_intervals_cover_the_true_value_from_5_to_60_documents(kind):
    """The coverage simulation that chose the interval (symmetric bootstrap-t) and MIN_INTERVAL_DOCS: at every
    size the study reports an interval for, a nominal 95% interval covers the true ratio (0) at least 93% of
    the time."""
    rng = np.random.default_rng(["rare-normal", "rare-skewed", "dense-skewed"].index(kind))
    for k in (MIN_INTERVAL_DOCS, 6, 8, 12, 20, 40, 60):
        sums, counts = _document_studies(rng, COVERAGE_SIMS, k, kind)
        w = rng.multinomial(k, np.full(k, 1 / k), size=1000).astype(float)
        ratio, se, q = bootstrap_t(sums, counts, w)
        coverage = float((np.abs(ratio) <= q * se).mean())
        assert coverage >= 0.93, (kind, k, coverage)


def test_the_old_percentile_interval_fails_that_coverage():
    """Mutation check: the percentile bootstrap the study used before covers far too rarely at few documents."""
    rng = np.random.default_rng(11)
    k, n_sims, covered = MIN_INTERVAL_DOCS, 1000, 0
    w = rng.multinomial(k, np.full(k, 1 / k), size=1000).astype(float)
    for _ in range(n_sims):
        sums, counts = _documents(rng, k, "rare-skewed")
        lo, hi = np.percentile((w @ sums) / (w @ counts), [2.5, 97.5])
        covered += lo <= 0.0 <= hi
    assert covered / n_sims < 0.88


def test_holm_matches_the_step_down_definition():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
    adj = holm(p)
    # sorted finite: 0.01, 0.03, 0.04, 0.2 with m = 4: 0.04, 0.09, 0.09 (monotone), 0.2
    assert adj[0] == pytest.approx(0.04) and adj[3] == pytest.approx(0.09) and adj[1] == pytest.approx(0.09)
    assert adj[4] == pytest.approx(0.2) and math.isnan(adj[2])


def test_holm_reachable_sets_each_row_to_its_floor_with_the_others_as_observed():
    p = np.array([1e-4, 0.3, 0.3, np.nan])
    floor = np.array([1e-4, 0.03, 0.01, 0.01])
    # row 0 is rejected (1e-4 * 3); then row 1 at 0.03 would face 0.05 / 2 = 0.025: no; row 2 at 0.01: yes
    assert holm_reachable(p, floor).tolist() == [True, False, True, False]


# ---- null simulations: how often each test rejects when its null hypothesis is true

N_NULL = 6000  # single tests per simulation: the binomial bound below is then within 0.01 of 0.05


def _level_bound(n: int, level: float = 0.05) -> float:
    """The largest rejection share a test of this level passes with, over n simulated tests: the 99.9th
    percentile of Binomial(n, level) / n (0.0587 at n = 6000)."""
    return float(stats.binom.ppf(0.999, n, level)) / n


def _symmetric_skewed_sums(rng, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A rare feature under the sign-flip test's null: 1-3 live positions per document, each change log-normal in
    size (sigma 1.5, heavily skewed) with a random sign, so each document's sum is symmetric about 0."""
    counts = rng.integers(1, 4, k).astype(float)
    total = int(counts.sum())
    x = rng.lognormal(0.0, 1.5, total) * rng.choice([-1.0, 1.0], total)
    return np.bincount(np.repeat(np.arange(k), counts.astype(int)), weights=x, minlength=k), counts


@pytest.mark.parametrize("k", [6, 12, 40])  # exact enumeration (k <= 14), and random sign vectors
def test_the_sign_flip_test_holds_its_level_under_its_null_with_skewed_sizes(k):
    assert _level_bound(N_NULL) - 0.05 <= 0.01
    rng = np.random.default_rng(k)
    rs = Resampler.for_passages(list(range(k)), seed=k, stream=0, n_boot=10, n_flips=4000)
    rejected = sum(rs.sign_flip(*_symmetric_skewed_sums(rng, k))[0] <= 0.05 for _ in range(N_NULL))
    assert rejected / N_NULL <= _level_bound(N_NULL)


def test_the_sign_flip_null_is_symmetry_not_a_zero_mean():
    """What the report says the test tests: a change that averages zero but is skewed (rare feature, log-normal
    sizes) is rejected far more often than 5% at 12 documents, so the null must be worded as symmetry."""
    rng = np.random.default_rng(3)
    k, n = 12, 2000
    rs = Resampler.for_passages(list(range(k)), seed=0, stream=0, n_boot=10, n_flips=10)
    rejected = 0
    for _ in range(n):
        counts = rng.integers(1, 4, k).astype(float)
        x = rng.lognormal(0.0, 1.5, int(counts.sum())) - math.exp(1.5 ** 2 / 2)  # mean 0, skewed
        sums = np.bincount(np.repeat(np.arange(k), counts.astype(int)), weights=x, minlength=k)
        rejected += rs.sign_flip(sums, counts)[0] <= 0.05
    assert rejected / n > 0.12


def _directions_study(rng, n_docs: int, n_draws: int, spread: float = 0.1):
    """The feature and its n_draws random directions as exchangeable directions (the null of the comparison):
    each direction's live KL per document is n_d * exp(direction effect + document effect + noise), with a
    `spread` (10%) between directions that every document shares. Returns per-document sums of each direction
    [1 + n_draws, n_docs] and the counts."""
    counts = rng.integers(1, 30, n_docs).astype(float)
    direction = spread * rng.standard_normal(1 + n_draws)[:, None]
    document = 0.5 * rng.standard_normal(n_docs)[None, :]
    noise = 0.3 * rng.standard_normal((1 + n_draws, n_docs))
    return counts[None, :] * np.exp(-1.0 + direction + document + noise), counts


def _old_control_p(rs: Resampler, sums: np.ndarray, counts: np.ndarray) -> float:
    """The comparison the study used before: sign-flip by document of feature KL - mean KL of the draws."""
    return rs.sign_flip(sums[0] - sums[1:].mean(axis=0), counts)[0]


def test_the_random_direction_comparison_holds_its_level_and_the_old_one_did_not():
    assert CONTROL_DRAWS_DEFAULT >= 2
    rng = np.random.default_rng(21)
    n_docs = 60
    rs = Resampler.for_passages(list(range(n_docs)), seed=0, stream=0, n_boot=10, n_flips=2000)
    new = old = 0
    n_old = 600  # the old test needs far fewer runs to show how badly it fails
    for i in range(N_NULL):
        sums, counts = _directions_study(rng, n_docs, CONTROL_DRAWS_DEFAULT)
        live_kl = sums.sum(axis=1) / counts.sum()
        new += compare_to_random(live_kl[0], live_kl[1:])["p_vs_random"] <= 0.05
        if i < n_old:
            old += _old_control_p(rs, sums, counts) <= 0.05
    assert new / N_NULL <= _level_bound(N_NULL)
    assert old / n_old > 0.3  # mutation check: the old test rejected a random direction most of the time


def test_the_random_direction_comparison_finds_a_direction_that_moves_the_model_more():
    rng = np.random.default_rng(4)
    found = 0
    for _ in range(200):
        sums, counts = _directions_study(rng, 60, 8)
        live_kl = sums.sum(axis=1) / counts.sum()
        out = compare_to_random(2.0 * live_kl[0], live_kl[1:])  # twice a random direction: ~6 spreads
        found += out["p_vs_random"] <= 0.05 and out["kl_ratio_random"] > 1
    assert found >= 0.9 * 200


def test_the_comparison_reports_the_ratio_spread_and_rank():
    out = compare_to_random(4.0, np.array([1.0, 2.0, 4.0, 0.5]))
    assert out["kl_ratio_random"] == pytest.approx(4.0 / (1.0 * 2.0 * 4.0 * 0.5) ** 0.25)
    assert out["ctrl_log_kl_live_sd"] == pytest.approx(np.log([1.0, 2.0, 4.0, 0.5]).std(ddof=1))
    assert out["ctrl_draws_above"] == 1
    t = math.log(out["kl_ratio_random"]) / (out["ctrl_log_kl_live_sd"] * math.sqrt(1 + 1 / 4))
    assert out["p_vs_random"] == pytest.approx(2 * stats.t.sf(abs(t), 3))
    one = compare_to_random(4.0, np.array([1.0]))  # one draw: a ratio, no spread, no test
    assert one["kl_ratio_random"] == 4.0 and math.isnan(one["p_vs_random"])
    assert math.isnan(compare_to_random(0.0, np.array([1.0, 2.0]))["kl_ratio_random"])  # nothing pushed
    assert required_spreads(8, 240, 0.05) == pytest.approx(stats.t.ppf(1 - 0.05 / 240 / 2, 7))


def _study(rng, seed, n_tests, n_docs, shift=0.0, heavy=True):
    """Per-document sums of n_tests dependent tests (a shared document factor) with heterogeneous counts, each
    test's sums symmetric about `shift * counts`, with heavy-tailed (log-normal) sizes for half the tests."""
    counts = rng.integers(1, 30, n_docs).astype(float)
    shared = rng.standard_normal(n_docs) * np.sqrt(counts)
    rs = Resampler.for_passages(list(range(n_docs)), seed=seed, stream=0, n_boot=10, n_flips=2000)
    p = []
    for j in range(n_tests):
        noise = 0.7 * shared * rng.uniform(0.5, 1.5) + rng.standard_normal(n_docs) * np.sqrt(counts)
        if heavy and j % 2:
            noise = noise * rng.lognormal(0.0, 1.0, n_docs)  # symmetric, heavy-tailed sizes
        p.append(rs.sign_flip(noise + shift * counts, counts)[0])
    return np.array(p)


N_STUDIES = 3000  # 2.5 Monte Carlo standard errors of a 5% rate: 0.01


@pytest.mark.parametrize("n_docs", [10, 40])  # exact enumeration, and random sign vectors
def test_under_no_effect_holm_flags_at_most_the_nominal_share_of_studies_in_each_family_and_both(n_docs):
    rng = np.random.default_rng(n_docs)
    n_tests = 8
    raw_any = loss_any = random_any = either = 0
    for s in range(N_STUDIES):
        p = _study(rng, s, n_tests, n_docs)
        p_random = []
        for _ in range(n_tests):
            sums, counts = _directions_study(rng, n_docs, CONTROL_DRAWS_DEFAULT)
            live_kl = sums.sum(axis=1) / counts.sum()
            p_random.append(compare_to_random(live_kl[0], live_kl[1:])["p_vs_random"])
        loss = bool((holm(p) <= FWER).any())
        random = bool((holm(np.array(p_random)) <= FWER).any())
        raw_any += bool((p <= FWER).any())
        loss_any += loss
        random_any += random
        either += loss or random
    slack = 2.5 * math.sqrt(FWER * (1 - FWER) / N_STUDIES)
    assert slack <= 0.01
    assert loss_any / N_STUDIES <= FWER + slack and random_any / N_STUDIES <= FWER + slack
    # two families each at FWER: the study-wide rate is up to N_FAMILIES * FWER, as the report says
    assert either / N_STUDIES <= N_FAMILIES * FWER + slack
    assert raw_any / N_STUDIES > 0.15  # the simulation bites: unadjusted, many studies find "effects"


def test_a_real_effect_is_found_after_adjustment():
    rng = np.random.default_rng(5)
    found = sum(bool((holm(_study(rng, s, 8, 40, shift=0.5, heavy=False)) <= 0.05).all()) for s in range(20))
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
