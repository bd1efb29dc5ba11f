"""Unit tests of `check_finite` (stage intervene): NaN only where the metric definitions allow it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.core.columns import PER_FEATURE
from pipeline.core.errors import NonFiniteMetricError, UserError
from pipeline.stages.aggregate import sanity
from pipeline.stages.intervene import check_finite
from pipeline.stats.resampling import MIN_INTERVAL_DOCS
from pipeline.stats.rows import CONTROL_COLUMNS

NAN_ALLOWED_WHEN_NO_LIVE = ("mean_act_live", "delta_ce_live", "kl_live")
NAN_ALLOWED_FEW_DOCS = ("delta_ce_se", "kl_se")

LAYER_METRICS = tuple(c.name for c in PER_FEATURE if c.table == "layer" and c.kind == "metric")
FLOAT_METRICS = ("ce_clean", "ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", "live_threshold", "frac_live",
                 "mean_act_live", "delta_ce_live", "kl_live", "density", "max_act")


def row(layer: int = 6, feature: int = 1234, alpha: float = 0.5, **overrides) -> dict:
    out = {"layer": layer, "feature": feature, "alpha": alpha, "intervention": "scale", "is_headline": False,
           "n_passages": 8, "n_scored": 80, "n_live": 5, "top_promoted": "[]", "top_suppressed": "[]"}
    out.update({key: 0.25 for key in LAYER_METRICS if key not in out})
    out.update(n_docs=MIN_INTERVAL_DOCS + 2, n_docs_live=MIN_INTERVAL_DOCS + 1, sae_context_size=128.0,
               frac_live_beyond_ctx=0.2, ctrl_draws=8)
    out.update(overrides)
    return out


def test_finite_rows_pass():
    check_finite([row(), row(feature=7, alpha=2.0)])


def test_live_metrics_may_be_nan_when_no_position_is_live():
    nan_live = {key: math.nan for key in ("mean_act_live", "delta_ce_live", "kl_live")}
    check_finite([row(n_live=0, **nan_live)])


def test_standard_errors_may_be_nan_below_the_fewest_documents_for_an_interval():
    few = MIN_INTERVAL_DOCS - 1
    check_finite([row(n_docs=few, n_docs_live=few, delta_ce_se=math.nan, kl_se=math.nan, kl_live_se=math.nan)])


def test_live_intervals_may_be_nan_when_the_feature_fires_in_too_few_documents():
    check_finite([row(n_docs_live=MIN_INTERVAL_DOCS - 1, kl_live_se=math.nan, delta_ce_live_lo=math.nan)])
    with pytest.raises(NonFiniteMetricError, match="kl_live_se"):
        check_finite([row(n_docs_live=MIN_INTERVAL_DOCS, kl_live_se=math.nan)])


def test_control_columns_may_be_nan_only_when_controls_are_off():
    off = {k: math.nan for k in CONTROL_COLUMNS}
    check_finite([row(ctrl_draws=0, **off)])
    with pytest.raises(NonFiniteMetricError, match="ctrl_kl_live"):
        check_finite([row(ctrl_kl_live=math.nan)])


def test_the_random_direction_test_may_be_nan_only_without_a_spread_or_a_positive_kl():
    check_finite([row(ctrl_draws=1, ctrl_log_kl_live_sd=math.nan, p_vs_random=math.nan)])  # one draw: ratio only
    check_finite([row(ctrl_log_kl_live_sd=0.0, p_vs_random=math.nan)])  # draws that agree exactly: no spread
    check_finite([row(kl_live=0.0, kl_ratio_random=math.nan, ctrl_log_kl_live_sd=math.nan, p_vs_random=math.nan)])
    with pytest.raises(NonFiniteMetricError, match="p_vs_random"):
        check_finite([row(p_vs_random=math.nan)])


@pytest.mark.parametrize("key", ["mean_act_live", "delta_ce_live", "kl_live"])
def test_a_nan_live_metric_with_live_positions_raises(key):
    with pytest.raises(NonFiniteMetricError, match=key):
        check_finite([row(n_live=3, **{key: math.nan})])


@pytest.mark.parametrize("key", ["delta_ce_se", "kl_se"])
def test_a_nan_standard_error_with_several_documents_raises(key):
    with pytest.raises(NonFiniteMetricError, match=key):
        check_finite([row(n_docs=MIN_INTERVAL_DOCS, **{key: math.nan})])


@pytest.mark.parametrize("key", ["mean_act_live", "kl_live", "delta_ce_se", "kl_se"])
def test_an_infinite_value_raises_even_where_nan_is_allowed(key):
    with pytest.raises(NonFiniteMetricError, match=key):
        check_finite([row(n_live=0, n_docs=1, **{key: math.inf})])


@pytest.mark.parametrize("key", [k for k in FLOAT_METRICS
                                 if k not in NAN_ALLOWED_WHEN_NO_LIVE + NAN_ALLOWED_FEW_DOCS])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_core_metric_raises_whatever_the_counts(key, value):
    with pytest.raises(NonFiniteMetricError, match=key):
        check_finite([row(n_live=0, n_docs=1, **{key: value})])


def test_the_error_names_layer_feature_alpha_and_key_of_the_offending_row():
    rows = [row(layer=3, feature=11, alpha=1.0), row(layer=3, feature=42, alpha=0.5, kl=math.nan)]
    with pytest.raises(NonFiniteMetricError) as info:
        check_finite(rows)
    message = str(info.value)
    assert "layer 3" in message
    assert "feature 42" in message
    assert "alpha 0.5" in message
    assert "kl is nan" in message
    assert "feature 11" not in message
    assert isinstance(info.value, UserError)  # printed as one line, without a traceback
    assert "\n" not in message


def test_check_finite_and_aggregate_sanity_allow_the_same_nans():
    """What intervene lets through, aggregate's sanity block does not count as unexpected, and back."""
    allowed = [
        row(n_live=0, mean_act_live=math.nan, delta_ce_live=math.nan, kl_live=math.nan),
        row(feature=2, n_docs=1, delta_ce_se=math.nan, kl_se=math.nan),
    ]
    check_finite(allowed)
    assert sanity(pd.DataFrame(allowed), 1.0)["nan"]["unexpected"] == 0

    for bad in (row(kl_live=math.nan), row(kl_se=math.nan), row(n_live=0, n_docs=1, delta_ce=math.nan)):
        with pytest.raises(NonFiniteMetricError):
            check_finite([bad])
        assert sanity(pd.DataFrame([bad]), 1.0)["nan"]["unexpected"] == 1
