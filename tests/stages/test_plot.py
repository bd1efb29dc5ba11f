"""Unit tests of stage `plot`: the CSVs behind the DVC plots, from a small hand-built per-feature table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.core.artifacts import (
    ALPHA_SWEEP_CSV,
    DCE_VS_ALPHA_PNG,
    KL_HEATMAP_CSV,
    KL_HEATMAP_PNG,
    KL_VS_ALPHA_PNG,
    LAYER_DCE_CSV,
    PLOTS,
    headline_png,
)
from pipeline.core.artifacts import PER_FEATURE as PER_FEATURE_CSV
from pipeline.core.errors import UserError
from pipeline.core.io import write_csv
from pipeline.core.modes import MODES
from pipeline.core.params.config import parse_params
from pipeline.stages import plot

SWEEP = [0.0, 1.0, 2.0, 4.0]
WORDS = MODES["scale"]
ALPHA = 2.0
# Layers hold different numbers of features, listed out of order.
FEATURES = {4: [30, 7, 19], 1: [5, 2]}


def per_feature_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for layer, feats in FEATURES.items():
        for f in feats:
            for a in SWEEP:
                live = float(rng.normal())
                rows.append({"layer": layer, "feature": f, "label": f"L{layer}/{f}", "alpha": a,
                             "delta_ce": float(rng.normal()), "delta_ce_se": float(rng.uniform(0.01, 0.1)),
                             "kl": float(rng.uniform(0, 2)), "kl_se": float(rng.uniform(0.01, 0.1)),
                             "delta_ce_live": live, "delta_ce_live_lo": live - 0.1, "delta_ce_live_hi": live + 0.2,
                             "ctrl_delta_ce_live": float(rng.normal()), "significant": bool(rng.uniform() < 0.5),
                             "kl_live": float(rng.uniform(0, 4)), "ctrl_kl_live": float(rng.uniform(0, 1)),
                             "kl_ratio_random": float(rng.uniform(1, 5))})
    return pd.DataFrame(rows)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    PLOTS.mkdir()
    return tmp_path


@pytest.mark.usefixtures("in_tmp")
def test_layer_dce_data_is_every_feature_at_alpha_sorted_by_layer_then_feature():
    per_feature = per_feature_table()
    data = plot.layer_dce_figure(per_feature, ALPHA, 50, WORDS)
    assert list(data.columns) == plot.LAYER_DCE_COLUMNS
    expected = [(layer, f) for layer in sorted(FEATURES) for f in sorted(FEATURES[layer])]
    assert list(zip(data["layer"], data["feature"], strict=True)) == expected
    src = per_feature[per_feature["alpha"] == ALPHA].set_index(["layer", "feature"])
    for _, row in data.iterrows():
        ref = src.loc[(row["layer"], row["feature"])]
        for col in ("label", "delta_ce_live", "delta_ce_live_lo", "ctrl_delta_ce_live", "delta_ce", "kl_se"):
            assert row[col] == ref[col]
    assert headline_png(ALPHA).is_file()


@pytest.mark.usefixtures("in_tmp")
def test_layer_dce_data_keeps_a_missing_standard_error_missing():
    per_feature = per_feature_table()
    per_feature[["delta_ce_live_lo", "delta_ce_live_hi"]] = math.nan  # one document: no interval
    data = plot.layer_dce_figure(per_feature, ALPHA, 50, WORDS)
    assert data["delta_ce_live_lo"].isna().all()  # the figure draws no bar; the data does not invent 0


@pytest.mark.usefixtures("in_tmp")
def test_alpha_sweep_data_is_the_mean_over_features_per_layer_and_alpha():
    per_feature = per_feature_table()
    sweep = plot.sweep_figures(per_feature, 50, WORDS)
    assert list(sweep.columns) == ["layer", "alpha", "delta_ce_live", "kl_live", "ctrl_delta_ce_live", "ctrl_kl_live",
                                   "delta_ce", "kl"]
    keys = list(zip(sweep["layer"], sweep["alpha"], strict=True))
    assert keys == sorted((layer, a) for layer in FEATURES for a in SWEEP)
    for _, row in sweep.iterrows():
        g = per_feature[(per_feature["layer"] == row["layer"]) & (per_feature["alpha"] == row["alpha"])]
        assert len(g) == len(FEATURES[row["layer"]])
        for col in ("delta_ce_live", "kl_live", "ctrl_kl_live", "delta_ce", "kl"):
            assert row[col] == pytest.approx(g[col].mean())
    assert DCE_VS_ALPHA_PNG.is_file() and KL_VS_ALPHA_PNG.is_file()


@pytest.mark.usefixtures("in_tmp")
def test_kl_heatmap_data_ranks_features_by_index_within_each_layer():
    per_feature = per_feature_table()
    data = plot.kl_heatmap(per_feature, ALPHA, 50, WORDS)
    assert list(data.columns) == ["layer", "rank", "feature", "kl_live", "ctrl_kl_live", "kl_ratio_random", "kl"]
    head = per_feature[per_feature["alpha"] == ALPHA].set_index(["layer", "feature"])["kl_live"]
    assert len(data) == len(head)
    for layer, feats in FEATURES.items():
        g = data[data["layer"] == layer]
        assert g["feature"].tolist() == sorted(feats)
        assert g["rank"].tolist() == list(range(len(feats)))
        assert g["kl_live"].tolist() == [head[(layer, f)] for f in sorted(feats)]
    assert KL_HEATMAP_PNG.is_file()


def test_plot_stage_writes_the_three_csvs_and_removes_a_stale_headline_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    per_feature = per_feature_table()
    write_csv(PER_FEATURE_CSV, per_feature)
    PLOTS.mkdir()
    stale = headline_png(4.0)
    stale.write_bytes(b"old figure")
    config = parse_params({"preset": "toy", "alpha": ALPHA, "alpha_sweep": SWEEP, "plot_dpi": 50})

    figures = plot.run_plot_stage(config)

    assert all(p.is_file() for p in figures)
    assert headline_png(ALPHA) in figures
    assert not stale.exists()
    layer_dce = pd.read_csv(LAYER_DCE_CSV)
    assert len(layer_dce) == sum(len(f) for f in FEATURES.values())
    assert set(layer_dce["feature"]) == {f for feats in FEATURES.values() for f in feats}
    sweep = pd.read_csv(ALPHA_SWEEP_CSV)
    assert len(sweep) == len(FEATURES) * len(SWEEP)
    heat = pd.read_csv(KL_HEATMAP_CSV)
    assert list(heat.columns) == ["layer", "rank", "feature", "kl_live", "ctrl_kl_live", "kl_ratio_random", "kl"]
    merged = heat.merge(per_feature[per_feature["alpha"] == ALPHA], on=["layer", "feature"], suffixes=("", "_src"))
    assert len(merged) == len(heat)
    assert np.allclose(merged["kl"], merged["kl_src"], rtol=1e-8, atol=0)  # %.9g in the CSV


def test_plot_stage_refuses_a_table_without_rows_at_alpha(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(PER_FEATURE_CSV, per_feature_table())
    config = parse_params({"preset": "toy", "alpha": 3.0, "alpha_sweep": SWEEP})
    with pytest.raises(UserError, match="no rows at alpha 3"):
        plot.run_plot_stage(config)
