"""The screen's verification (pipeline.engine.screen_check, pipeline.stats.screen_agreement): which features are run exactly, and the agreement
figures, on synthetic numbers with known answers and on a tiny random model run by the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.engine.attribution import LayerScreen, ScreenLayer, screen
from pipeline.engine.run import run_layer
from pipeline.engine.screen_check import pick_features, verify_layer
from pipeline.stats.screen_agreement import agreement, agreement_figures, spearman_interval
from tests.builders import build_model, build_sae, build_tokens


def synthetic_screen(slope_sum: np.ndarray, n_firing: np.ndarray, layer: int = 3) -> LayerScreen:
    d = len(slope_sum)
    return LayerScreen(layer=layer, n_scored=1000, slope_sum=np.asarray(slope_sum, dtype=np.float64),
                       n_firing=np.asarray(n_firing, dtype=np.int64), act_sum=np.ones(d), max_act=np.ones(d))


def test_picks_are_the_largest_firing_slopes_and_a_seeded_sample_of_the_rest():
    rng = np.random.default_rng(0)
    slope_sum = rng.normal(size=200)
    n_firing = rng.integers(1, 50, size=200)
    n_firing[:20] = 0  # never fire: never picked, whatever their (zero) slope
    slope_sum[:20] = 0.0
    slope_sum[20] = 99.0  # the largest
    layer = synthetic_screen(slope_sum, n_firing)
    picks = pick_features(layer, top_k=5, n_random=30, seed=1)
    firing = np.flatnonzero(n_firing > 0)
    expected_top = firing[np.argsort(-np.abs(slope_sum[firing]), kind="stable")[:5]]
    assert picks.top == expected_top.tolist() and picks.top[0] == 20
    assert len(picks.random) == 30 and not set(picks.random) & set(picks.top)
    assert all(n_firing[f] > 0 for f in picks.random)
    assert pick_features(layer, 5, 30, seed=1) == picks  # seeded
    assert pick_features(layer, 5, 30, seed=2).random != picks.random
    other_layer = synthetic_screen(slope_sum, n_firing, layer=4)
    assert pick_features(other_layer, 5, 30, seed=1).random != picks.random  # layers get their own samples
    everything = pick_features(layer, top_k=5, n_random=10_000, seed=1)
    assert sorted(everything.features) == firing.tolist()  # fewer firing than asked: all of them


def test_spearman_is_the_rank_formula_and_pearson_numpys():
    rng = np.random.default_rng(3)
    est, exact = rng.normal(size=40), rng.normal(size=40)
    exact = exact + 0.7 * est
    figures = agreement_figures(est, exact, np.ones(40), top_n=10)
    rank_e, rank_x = np.argsort(np.argsort(est)), np.argsort(np.argsort(exact))
    by_formula = 1 - 6 * ((rank_e - rank_x) ** 2).sum() / (40 * (40**2 - 1))  # no ties
    assert figures["spearman"] == pytest.approx(by_formula, abs=1e-12)
    assert figures["pearson"] == pytest.approx(np.corrcoef(est, exact)[0, 1], abs=1e-12)
    assert figures["spearman_lo"] < figures["spearman"] < figures["spearman_hi"]
    assert figures["sign_agreement"] == pytest.approx(np.mean(np.sign(est) == np.sign(exact)))


def test_a_monotone_but_bent_estimate_has_rank_agreement_one_and_keeps_the_top():
    exact = np.linspace(-2, 3, 30)
    est = np.sign(exact) * exact**2  # same order, same signs, not linear
    figures = agreement_figures(est, exact, np.ones(30), top_n=5)
    assert figures["spearman"] == pytest.approx(1.0) and figures["pearson"] < 0.99
    assert figures["sign_agreement"] == 1.0 and figures["top_overlap"] == 5
    flipped = agreement_figures(-est, exact, np.ones(30), top_n=5)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["sign_agreement"] == 0.0
    assert flipped["top_overlap"] == 5  # magnitudes still agree


def test_per_firing_agreement_removes_what_density_alone_explains():
    """Estimate and exact both = density x per-firing effect; when the per-firing estimates are noise, the plain
    correlation is still high (density agrees with itself) and the per-firing one is not."""
    rng = np.random.default_rng(5)
    n = 300
    density = 10 ** rng.uniform(-4, -1, size=n)
    exact_per_firing = rng.uniform(0.5, 1.5, size=n)
    est_per_firing = rng.uniform(0.5, 1.5, size=n)  # unrelated to the exact one
    figures = agreement_figures(density * est_per_firing, density * exact_per_firing, 1 / density, top_n=10)
    assert figures["spearman"] > 0.9
    assert abs(figures["spearman_per_firing"]) < 0.2  # the scale N * S / n_firing is 1 / density


def test_the_interval_narrows_with_more_features_and_stays_in_range():
    lo40, hi40 = spearman_interval(0.8, 40)
    lo400, hi400 = spearman_interval(0.8, 400)
    assert -1 < lo40 < lo400 < 0.8 < hi400 < hi40 < 1
    assert all(math.isnan(v) for v in spearman_interval(0.8, 3))


@pytest.fixture(scope="module")
def tiny():
    model = build_model()
    sae = build_sae(hook_name="blocks.1.hook_resid_post", enc_bias=-0.3)
    tokens = build_tokens(n=6, t=12)
    layer = screen(model, [ScreenLayer(1, sae, 2)], tokens).layers[1]
    return model, sae, tokens, layer


def test_verify_layer_runs_the_picks_exactly(tiny):
    model, sae, tokens, layer = tiny
    picks = pick_features(layer, top_k=3, n_random=5, seed=0)
    values = [0.0, 1.0, 2.0]
    rows = verify_layer(model, sae, 2, tokens, layer, picks, values)
    assert len(rows) == 8 * 3
    exact = run_layer(model, sae, 2, tokens, picks.features, values)
    expected = (exact.ce_int - exact.ce_clean[None, None]).mean(axis=(2, 3))
    for fi, feature in enumerate(picks.features):
        for ai, alpha in enumerate(values):
            row = rows[(rows["feature"] == feature) & (rows["alpha"] == alpha)].iloc[0]
            assert row["exact"] == expected[fi, ai]
            assert row["estimate"] == (alpha - 1) * layer.slope[feature]
            assert row["group"] == ("top" if feature in picks.top else "random")
    assert (rows.loc[rows["alpha"] == 1.0, ["exact", "estimate"]] == 0).all().all()
    table = agreement(rows, layer.n_scored, top_n=3)
    assert set(table["alpha"]) == {0.0, 2.0}  # alpha = 1 has nothing to agree on
    assert set(table["subset"]) == {"random", "all"} and set(table["estimator"]) == {"estimate"}
    assert (table.loc[table["subset"] == "all", "n_features"] == 8).all()
    assert (table.loc[table["subset"] == "random", "n_features"] == 5).all()


def test_near_alpha_one_the_estimate_agrees_and_second_order_agrees_better(tiny):
    model, sae, tokens, layer = tiny
    picks = pick_features(layer, top_k=4, n_random=8, seed=0)
    rows = verify_layer(model, sae, 2, tokens, layer, picks, [0.95, 1.05, 0.5, 1.5], second_order=True)
    table = agreement(rows, layer.n_scored, top_n=4)
    near = table[(table["alpha"].isin([0.95, 1.05])) & (table["subset"] == "all")]
    assert (near["spearman"] > 0.95).all() and (near["sign_agreement"] == 1.0).all()
    for alpha in (0.95, 1.05, 0.5, 1.5):
        at = rows[rows["alpha"] == alpha]
        first = np.abs(at["estimate"] - at["exact"]).sum()
        second = np.abs(at["estimate_2"] - at["exact"]).sum()
        assert second < 0.5 * first, alpha  # the error left is third order
