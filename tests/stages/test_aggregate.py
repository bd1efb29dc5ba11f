"""Unit tests of stage `aggregate`: per-layer tables, the `sanity` block and summary.json's headline
numbers, from small hand-built per-feature tables (no model, no DVC)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import artifacts, columns
from pipeline.core.columns import PER_FEATURE_COLUMNS
from pipeline.core.errors import UserError
from pipeline.core.io import read_json, write_csv
from pipeline.core.params.config import parse_params
from pipeline.stages.aggregate import (
    KL_TOLERANCE,
    add_study_tests,
    load_layer_tables,
    per_feature_table,
    per_layer_headline,
    per_layer_table,
    run_aggregate_stage,
    sanity,
    summary,
)
from pipeline.stats.resampling import MIN_INTERVAL_DOCS

SWEEP = [0.0, 1.0, 2.0]
LAYER_METRICS = [c.name for c in columns.PER_FEATURE if c.table == "layer" and c.kind == "metric"]
# The artifacts as dvc.yaml names them, relative to the repository root.
FEATURES_CSV = artifacts.FEATURES
PER_FEATURE_CSV = artifacts.PER_FEATURE
PER_LAYER_CSV = artifacts.PER_LAYER
SUMMARY_JSON = artifacts.SUMMARY


def layer_csv(layer: int) -> Path:
    return artifacts.layer_metrics(layer)


def metric_row(layer: int, feature: int, alpha: float, **overrides) -> dict:
    """One (layer, feature, alpha) row with every metric finite and distinct per row."""
    seed = 1000 * layer + 10 * feature + int(4 * alpha)
    rng = np.random.default_rng(seed)
    ce_clean = 3.0 + 0.1 * layer
    delta = 0.0 if alpha == 1.0 else float(rng.uniform(0.01, 1.0))
    kl = 0.0 if alpha == 1.0 else float(rng.uniform(0.01, 1.0))
    row = {
        "layer": layer, "feature": feature, "alpha": alpha, "intervention": "scale",
        "is_headline": alpha == 2.0, "n_passages": 4, "n_scored": 40,
        "ce_clean": ce_clean, "ce_int": ce_clean + delta, "delta_ce": delta, "delta_ce_se": 0.01,
        "kl": kl, "kl_se": 0.02, "live_threshold": 0.5, "n_live": 4, "frac_live": 0.1,
        "mean_act_live": 1.5, "delta_ce_live": 2 * delta, "kl_live": 3 * kl,
        "density": 0.2, "max_act": 3.0, "top_promoted": "[]", "top_suppressed": "[]",
    }
    row.update({key: float(rng.uniform(0.01, 0.02)) for key in LAYER_METRICS if key not in row})  # intervals, ...
    row.update(n_docs=4, n_docs_live=3, n_passages_live=3, n_docs_firing=4, n_passages_firing=4,
               sae_context_size=128.0, ctrl_kl_live=1.5 * kl, ctrl_delta_ce_live=0.5 * delta,
               ctrl_draws=8, ctrl_draws_above=0, kl_ratio_random=2.0 if kl else math.nan,
               p_delta_ce_live=1.0 if alpha == 1.0 else float(rng.uniform(0, 0.02)), min_p_delta_ce_live=1e-4,
               p_vs_random=1.0 if alpha == 1.0 else float(rng.uniform(0, 0.5)))
    row.update(overrides)
    return row


def table(layers=(3, 5), features=(10, 11, 12), alphas=SWEEP) -> pd.DataFrame:
    """A per-feature table as aggregate makes it: per-layer rows, then the study-wide tests."""
    rows = pd.DataFrame([metric_row(layer, f, a) for layer in layers for f in features for a in alphas])
    return add_study_tests(rows, 1.0)


def config(**overrides):
    raw = {"preset": "toy", "layers": [3, 5], "alpha": 2.0, "alpha_sweep": SWEEP}
    raw.update(overrides)
    return parse_params(raw)


# ---- per_layer_table

def test_per_layer_table_has_one_row_per_layer_and_alpha_with_the_feature_statistics():
    per_feature = table()
    out = per_layer_table(per_feature)
    assert len(out) == 2 * len(SWEEP)
    for _, row in out.iterrows():
        g = per_feature[(per_feature["layer"] == row["layer"]) & (per_feature["alpha"] == row["alpha"])]
        assert row["n_features"] == g["feature"].nunique() == 3
        assert row["ce_clean"] == pytest.approx(g["ce_clean"].mean())
        assert row["delta_ce_mean"] == pytest.approx(np.mean(g["delta_ce"]))
        assert row["delta_ce_std"] == pytest.approx(np.std(g["delta_ce"], ddof=1))
        assert row["delta_ce_min"] == g["delta_ce"].min()
        assert row["delta_ce_max"] == g["delta_ce"].max()
        assert row["kl_mean"] == pytest.approx(np.mean(g["kl"]))
        assert row["kl_std"] == pytest.approx(np.std(g["kl"], ddof=1))
        assert row["kl_min"] == g["kl"].min()
        assert row["kl_max"] == g["kl"].max()
        assert row["delta_ce_live_mean"] == pytest.approx(np.mean(g["delta_ce_live"]))
        assert row["kl_live_mean"] == pytest.approx(np.mean(g["kl_live"]))
        assert row["frac_live_mean"] == pytest.approx(np.mean(g["frac_live"]))


def test_per_layer_live_means_skip_features_with_no_live_position():
    per_feature = table(layers=(3,))
    silent = (per_feature["feature"] == 10) & (per_feature["alpha"] == 2.0)
    per_feature.loc[silent, ["delta_ce_live", "kl_live", "mean_act_live"]] = math.nan
    per_feature.loc[silent, "n_live"] = 0
    out = per_layer_table(per_feature).set_index("alpha").loc[2.0]
    others = per_feature[(per_feature["alpha"] == 2.0) & (per_feature["feature"] != 10)]
    assert out["delta_ce_live_mean"] == pytest.approx(others["delta_ce_live"].mean())
    assert out["kl_live_mean"] == pytest.approx(others["kl_live"].mean())


def test_per_layer_table_of_a_single_feature_has_its_value_as_mean_min_max_and_no_std():
    per_feature = table(layers=(3,), features=(10,))
    out = per_layer_table(per_feature).set_index("alpha").loc[2.0]
    value = per_feature.loc[per_feature["alpha"] == 2.0, "delta_ce"].item()
    assert out["n_features"] == 1
    assert out["delta_ce_mean"] == out["delta_ce_min"] == out["delta_ce_max"] == value
    assert math.isnan(out["delta_ce_std"])  # a spread needs two features


# ---- sanity

def test_sanity_counts_identity_rows_and_those_that_are_not_exactly_zero():
    per_feature = table()
    ident = per_feature["alpha"] == 1.0
    assert (per_feature.loc[ident, ["delta_ce", "kl"]] == 0).all().all()
    out = sanity(per_feature, 1.0)["identity"]
    assert out["alpha"] == 1.0
    assert out["rows"] == int(ident.sum()) == 2 * 3
    assert out["rows_nonzero"] == 0

    broken = per_feature.copy()
    first, second = broken.index[ident][:2]
    broken.loc[first, "delta_ce"] = 1e-7  # a delta CE alone makes the row nonzero
    broken.loc[second, "kl"] = 1e-9  # and so does a KL alone
    assert sanity(broken, 1.0)["identity"]["rows_nonzero"] == 2
    broken.loc[broken.index[ident][2], "kl_live"] = 1e-9  # and so does a live KL
    assert sanity(broken, 1.0)["identity"]["rows_nonzero"] == 3


def test_sanity_without_an_identity_value_reports_no_identity_counts():
    assert sanity(table(), None)["identity"] == {"alpha": None}


def test_sanity_allows_nan_live_metrics_only_where_no_position_is_live():
    per_feature = table()
    live_cols = ["delta_ce_live", "kl_live", "mean_act_live"]
    silent = per_feature.index[:2]
    per_feature.loc[silent, live_cols] = math.nan
    per_feature.loc[silent, "n_live"] = 0
    out = sanity(per_feature, 1.0)["nan"]
    assert out["unexpected"] == 0
    assert out["no_live_rows"] == 2

    per_feature.loc[per_feature.index[5], "kl_live"] = math.nan  # n_live is 4 there
    out = sanity(per_feature, 1.0)["nan"]
    assert out["unexpected"] == 1
    assert out["first"] == {"column": "kl_live", "layer": int(per_feature["layer"].iloc[5]),
                            "feature": int(per_feature["feature"].iloc[5]), "alpha": float(per_feature["alpha"].iloc[5])}


def test_sanity_never_allows_an_infinity():
    per_feature = table()
    per_feature.loc[per_feature.index[0], "ctrl_kl"] = math.inf
    assert sanity(per_feature, 1.0)["nan"]["unexpected"] == 1


def test_sanity_allows_nan_intervals_only_below_the_fewest_documents_for_one():
    per_feature = table()
    few = per_feature.index[0]
    per_feature.loc[few, ["delta_ce_se", "kl_se", "delta_ce_lo", "kl_hi"]] = math.nan
    per_feature.loc[few, "n_docs"] = MIN_INTERVAL_DOCS - 1
    assert sanity(per_feature, 1.0)["nan"]["unexpected"] == 0

    enough = per_feature.index[1]  # enough documents: the interval exists
    per_feature.loc[enough, ["delta_ce_se", "kl_se"]] = math.nan
    per_feature.loc[enough, "n_docs"] = MIN_INTERVAL_DOCS
    assert sanity(per_feature, 1.0)["nan"]["unexpected"] == 2


@pytest.mark.parametrize("column", ["delta_ce", "kl", "ce_clean", "ce_int", "frac_live", "density", "max_act"])
def test_sanity_counts_a_nan_in_a_metric_that_is_never_allowed_to_be_nan(column):
    per_feature = table()
    per_feature.loc[per_feature.index[3], column] = math.nan
    per_feature["n_live"] = 0  # even with no live position and one passage
    per_feature["n_passages"] = 1
    assert sanity(per_feature, 1.0)["nan"]["unexpected"] == 1


def test_sanity_tolerates_float_rounding_below_zero_kl_but_counts_real_negative_kl():
    per_feature = table()
    per_feature.loc[per_feature.index[0], "kl"] = -KL_TOLERANCE / 10
    assert sanity(per_feature, 1.0)["kl"]["below_tolerance"] == 0
    per_feature.loc[per_feature.index[1], "kl"] = -1e-3
    per_feature.loc[per_feature.index[2], "kl"] = -2 * KL_TOLERANCE
    out = sanity(per_feature, 1.0)["kl"]
    assert out["below_tolerance"] == 2
    assert out["min"] == -1e-3


def test_sanity_checks_every_row_shares_one_clean_cross_entropy():
    per_feature = table(layers=(3,))
    assert sanity(per_feature, 1.0)["clean_ce"]["same"]
    per_feature.loc[per_feature.index[0], "ce_clean"] += 1e-3
    out = sanity(per_feature, 1.0)["clean_ce"]
    assert not out["same"] and out["spread"] == pytest.approx(1e-3, rel=1e-3)


# ---- summary

def test_summary_headline_numbers_are_means_over_the_features_at_alpha_only():
    per_feature = table()
    head = per_feature[per_feature["alpha"] == 2.0]
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    assert out["alpha"] == 2.0
    assert out["intervention"] == "scale"
    assert out["n_layers"] == 2
    assert out["n_features"] == len(head) == 6
    assert out["mean_delta_ce"] == pytest.approx(head["delta_ce"].mean(), rel=1e-5)
    assert out["mean_kl"] == pytest.approx(head["kl"].mean(), rel=1e-5)
    assert out["mean_delta_ce_live"] == pytest.approx(head["delta_ce_live"].mean(), rel=1e-5)
    assert out["mean_kl_live"] == pytest.approx(head["kl_live"].mean(), rel=1e-5)

    # Rows at other alphas do not move the headline numbers.
    moved = per_feature.copy()
    moved.loc[moved["alpha"] != 2.0, ["delta_ce", "kl", "delta_ce_live", "kl_live"]] += 100.0
    moved_out = summary(moved, config(), sanity(moved, 1.0))
    for key in ("mean_delta_ce", "mean_kl", "mean_delta_ce_live", "mean_kl_live", "max_kl"):
        assert moved_out[key] == out[key]
    assert per_layer_headline(moved, 2.0) == per_layer_headline(per_feature, 2.0)


def test_summary_json_holds_the_headline_columns_the_schema_marks_and_no_per_layer_figures():
    per_feature = table()
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    marked = {f"{c.headline}_{c.name}" for c in columns.PER_FEATURE if c.headline}
    assert marked <= set(out)
    assert "per_layer" not in out and "generation" not in out  # summary_details.json holds those


def test_per_layer_means_are_taken_within_each_layer_at_alpha():
    per_feature = table()
    out = per_layer_headline(per_feature, 2.0)
    assert set(out) == {"layer_3", "layer_5"}
    for layer in (3, 5):
        g = per_feature[(per_feature["alpha"] == 2.0) & (per_feature["layer"] == layer)]
        assert out[f"layer_{layer}"]["mean_delta_ce"] == pytest.approx(g["delta_ce"].mean(), rel=1e-5)
        assert out[f"layer_{layer}"]["mean_kl"] == pytest.approx(g["kl"].mean(), rel=1e-5)
        assert out[f"layer_{layer}"]["median_kl_ratio_random"] == pytest.approx(g["kl_ratio_random"].median(),
                                                                               rel=1e-5)


def test_summary_max_kl_names_the_feature_with_the_largest_kl_at_alpha():
    per_feature = table()
    target = per_feature.index[(per_feature["layer"] == 5) & (per_feature["feature"] == 11)
                               & (per_feature["alpha"] == 2.0)][0]
    per_feature.loc[target, "kl"] = 7.25
    # A larger KL at another alpha is not the headline's.
    per_feature.loc[per_feature.index[(per_feature["alpha"] == 0.0)][0], "kl"] = 50.0
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    assert out["max_kl"] == {"layer": 5, "feature": 11, "kl": 7.25}


def test_summary_numbers_keep_six_significant_digits():
    per_feature = table(layers=(3,), features=(10,))
    per_feature.loc[per_feature["alpha"] == 2.0, "delta_ce"] = 0.123456789
    out = summary(per_feature, config(layers=[3]), sanity(per_feature, 1.0))
    assert out["mean_delta_ce"] == float(f"{0.123456789:.6g}")
    assert abs(out["mean_delta_ce"] - 0.123456789) < 1e-6


def test_summary_of_a_single_layer_has_per_layer_means_equal_to_the_headline_means():
    per_feature = table(layers=(5,))
    out = summary(per_feature, config(layers=[5]), sanity(per_feature, 1.0))
    assert out["n_layers"] == 1
    per_layer = per_layer_headline(per_feature, 2.0)
    assert list(per_layer) == ["layer_5"]
    assert per_layer["layer_5"] == {k: out[k] for k in per_layer["layer_5"]}


def test_summary_live_means_are_none_when_no_feature_has_a_live_position_and_skip_silent_ones_otherwise():
    per_feature = table()
    head = per_feature["alpha"] == 2.0
    per_feature.loc[head, ["delta_ce_live", "kl_live", "mean_act_live"]] = math.nan
    per_feature.loc[head, "n_live"] = 0
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    assert out["mean_delta_ce_live"] is None
    assert out["mean_kl_live"] is None
    assert out["mean_delta_ce"] is not None
    assert out["sanity"]["nan_values"] == 0

    one_live = per_feature.index[head][0]
    per_feature.loc[one_live, ["delta_ce_live", "kl_live"]] = [0.25, 0.5]
    per_feature.loc[one_live, "n_live"] = 3
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    assert out["mean_delta_ce_live"] == 0.25
    assert out["mean_kl_live"] == 0.5


def test_summary_with_no_row_at_alpha_reports_zero_features_and_no_numbers():
    per_feature = table(alphas=(0.0, 1.0))
    out = summary(per_feature, config(), sanity(per_feature, 1.0))
    assert out["n_features"] == 0
    assert out["n_layers"] == 0
    assert out["mean_delta_ce"] is None and out["mean_kl"] is None
    assert out["max_kl"] == {"layer": None, "feature": None, "kl": None}
    assert per_layer_headline(per_feature, 2.0) == {}


# ---- the stage, on files in a temporary repository root

def write_inputs(layers, features=(10, 11, 12), alphas=SWEEP, missing_feature=None):
    rows = [{"layer": layer, "feature": f, "label": f"feature {f} of {layer}", "source": "csv",
             "density": 0.01 * f, "max_act": float(f), "neuronpedia_url": "", "np_pos_tokens": "",
             "np_neg_tokens": "", "reason": "test"}
            for layer in layers for f in features if (layer, f) != missing_feature]
    write_csv(FEATURES_CSV, pd.DataFrame(rows))
    for layer in layers:
        write_csv(layer_csv(layer), table(layers=(layer,), features=features, alphas=alphas))
    # stage generate's table (its summary: tests/stages/test_generate.py)
    generation = [{c: 0.5 for c in columns.GENERATION_COLUMNS} | {"layer": layer, "feature": f, "alpha": 2.0,
                   "intervention": "scale", "decoding": d} for layer in layers for f in features for d in ("greedy", "sampled")]
    write_csv(artifacts.GENERATION_METRICS, pd.DataFrame(generation)[list(columns.GENERATION_COLUMNS)])


def test_aggregate_stage_writes_tables_and_a_summary_json_with_null_for_nan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3, 5])
    frame = table(layers=(5,))
    silent = (frame["alpha"] == 2.0) & (frame["feature"] == 12)
    frame.loc[silent, ["delta_ce_live", "kl_live", "mean_act_live"]] = math.nan
    frame.loc[silent, "n_live"] = 0
    write_csv(layer_csv(5), frame)

    result = run_aggregate_stage(config())
    on_disk = read_json(SUMMARY_JSON)
    assert on_disk["n_features"] == result["n_features"] == 6
    assert on_disk["sanity"] == {"nan_values": 0, "kl_negative_rows": 0, "identity_rows_nonzero": 0}
    details = read_json(artifacts.SUMMARY_DETAILS)
    assert details["sanity"]["nan"]["no_live_rows"] == 1
    assert details["sanity"]["identity"]["rows"] == 6
    assert set(details["per_layer"]) == {"layer_3", "layer_5"}
    assert set(details["generation"]["by_alpha"]) == {"alpha_2"}

    per_feature = pd.read_csv(PER_FEATURE_CSV)
    assert tuple(per_feature.columns) == PER_FEATURE_COLUMNS
    assert len(per_feature) == 2 * 3 * len(SWEEP)
    assert (per_feature["is_headline"] == (per_feature["alpha"] == 2.0)).all()
    assert (per_feature["source_max_act"] == per_feature["feature"].astype(float)).all()
    assert per_feature["label"].str.startswith("feature ").all()
    order = per_feature[["layer", "feature", "alpha"]].to_records(index=False).tolist()
    assert order == sorted(order)

    per_layer = pd.read_csv(PER_LAYER_CSV)
    assert len(per_layer) == 2 * len(SWEEP)


def test_aggregate_reads_only_the_configured_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3, 5, 7])  # layer 7 left from an earlier run with other layers
    out = per_feature_table(config(layers=[3, 5]))
    assert sorted(out["layer"].unique()) == [3, 5]


def test_aggregate_refuses_a_layer_file_without_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3])
    with pytest.raises(UserError, match="layer_5.csv"):
        load_layer_tables(config(layers=[3, 5]))


def test_aggregate_refuses_metrics_of_a_feature_missing_from_features_csv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3, 5], missing_feature=(5, 11))
    with pytest.raises(UserError, match="layer 5 feature 11"):
        per_feature_table(config())


def test_aggregate_refuses_a_layer_file_whose_alphas_differ_from_the_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3, 5], alphas=(0.0, 1.0, 4.0))  # as many alphas as the sweep, other values
    with pytest.raises(UserError, match="stale"):
        load_layer_tables(config())


def test_aggregate_refuses_a_layer_file_with_fewer_alphas_than_the_sweep_as_stale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs([3, 5], alphas=(0.0, 2.0))
    with pytest.raises(UserError, match="stale"):
        load_layer_tables(config())


# ---- the study-wide tests

def test_holm_adjusts_across_every_layer_and_feature_and_skips_the_identity():
    per_feature = table()
    tests = per_feature[per_feature["alpha"] != 1.0]
    m = len(tests)  # 2 layers x 3 features x 2 non-identity alphas
    assert m == 12 and per_feature.loc[per_feature["alpha"] == 1.0, "p_adj_delta_ce_live"].isna().all()
    smallest = tests["p_delta_ce_live"].idxmin()
    assert per_feature.loc[smallest, "p_adj_delta_ce_live"] == pytest.approx(min(1.0, m * tests["p_delta_ce_live"].min()))
    assert (tests["p_adj_delta_ce_live"] >= tests["p_delta_ce_live"]).all()
    assert (per_feature["significant"] == (per_feature["p_adj_delta_ce_live"] <= 0.05)).all()


def test_a_row_whose_smallest_possible_p_cannot_pass_holm_is_not_testable():
    per_feature = table()
    rows = per_feature.index[per_feature["alpha"] == 2.0]
    raw = per_feature.drop(columns=["p_adj_delta_ce_live", "testable", "significant"])
    raw.loc[rows[0], ["p_delta_ce_live", "min_p_delta_ce_live"]] = [0.25, 2.0 / 2 ** 3]  # 3 documents: p >= 0.25
    out = add_study_tests(raw, 1.0)
    assert not out.loc[rows[0], "testable"] and out.loc[rows[1], "testable"]


def _holm_study(p, min_p):
    rows = pd.DataFrame({"alpha": 2.0, "p_delta_ce_live": p, "min_p_delta_ce_live": min_p,
                         "p_vs_random": np.nan, "kl_ratio_random": np.nan})
    return add_study_tests(rows, 1.0)


def test_testable_follows_holm_not_its_first_threshold():
    # 10 tests, 9 clearly significant; the last has min_p 0.04: Holm's last threshold is 0.05 / 1
    p = [1e-6] * 9 + [0.04]
    out = _holm_study(p, [1e-6] * 9 + [0.04])
    assert out["significant"].all() and out["testable"].all()
    # the old rule, min_p <= FWER / m, called that significant row too rare to test (the mutation check)
    old_testable = np.array([1e-6] * 9 + [0.04]) <= 0.05 / len(p)
    assert not old_testable[-1] and out.loc[9, "significant"]


def test_testable_is_whether_its_own_smallest_p_could_pass_given_the_others():
    # with no other rejection, a row needs p <= 0.05 / 3 to be rejected first
    out = _holm_study([0.5, 0.6, 0.7], [0.02, 0.01, 1e-4])
    assert out["testable"].tolist() == [False, True, True]
    # a row whose floor equals its p and that is not significant is too rare
    out = _holm_study([0.001, 0.3], [0.001, 0.25])
    assert out["significant"].tolist() == [True, False] and out["testable"].tolist() == [True, False]


def test_the_three_verdicts_partition_the_tests():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = int(rng.integers(1, 40))
        min_p = 2.0 / 2.0 ** rng.integers(1, 12, m)
        p = np.maximum(min_p, rng.uniform(0, 1, m) ** 4)
        out = _holm_study(p, min_p)
        sig = out["significant"]
        rare = ~out["testable"] & ~sig
        rest = out["testable"] & ~sig
        assert not (sig & ~out["testable"]).any()  # significant is always testable
        assert int(sig.sum() + rare.sum() + rest.sum()) == m


def test_more_or_less_than_random_needs_an_adjusted_p_and_says_which_way():
    per_feature = table()
    raw = per_feature.copy()
    row = raw.index[(raw["alpha"] == 2.0)][0]
    raw.loc[row, ["p_vs_random", "kl_ratio_random"]] = [1e-6, 3.0]
    out = add_study_tests(raw, 1.0)
    assert out.loc[row, "more_than_random"] and not out.loc[row, "less_than_random"]
    raw.loc[row, "kl_ratio_random"] = 0.3  # the random directions move the model more
    out = add_study_tests(raw, 1.0)
    assert out.loc[row, "less_than_random"] and not out.loc[row, "more_than_random"]
    raw.loc[row, "p_vs_random"] = 0.2
    out = add_study_tests(raw, 1.0)
    assert not out.loc[row, "less_than_random"] and not out.loc[row, "more_than_random"]
