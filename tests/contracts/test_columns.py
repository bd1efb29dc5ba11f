"""One column schema (pipeline.core.columns): every table's columns come from it, every NaN condition it names has
a rule, and the tables a study writes have exactly the declared columns."""

from __future__ import annotations

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.columns import (
    GENERATION_COLUMNS,
    HEADLINE,
    LAYER_COLUMNS,
    NAN_WHEN,
    PER_FEATURE,
    PER_FEATURE_COLUMNS,
    PER_LAYER,
    SCREEN_AGREEMENT_COLUMNS,
    SCREEN_COLUMNS,
    SCREEN_VERIFICATION_COLUMNS,
)
from pipeline.stats.nan_rules import nan_allowed


def test_each_column_is_declared_once_with_a_meaning():
    assert len(PER_FEATURE_COLUMNS) == len(set(PER_FEATURE_COLUMNS))
    assert all(c.meaning and c.table in ("layer", "study", "features") for c in PER_FEATURE)
    assert all(c.kind in ("metric", "key", "flag", "test", "text") for c in PER_FEATURE)


def test_every_nan_condition_the_schema_names_has_a_rule():
    frame = pd.DataFrame([{c: 1.0 for c in PER_FEATURE_COLUMNS}])
    rules = nan_allowed(frame)
    assert set(rules) == set(NAN_WHEN)


def test_aggregates_and_headline_refer_to_declared_numeric_columns():
    names = set(PER_FEATURE_COLUMNS)
    assert {a.of for a in PER_LAYER} <= names
    assert len({a.name for a in PER_LAYER}) == len(PER_LAYER)
    assert all(c.kind == "metric" and c.headline in ("mean", "median") for c in HEADLINE)


def test_the_toy_studys_tables_have_exactly_the_declared_columns(toy_study):
    for layer in (0, 11):
        table = pd.read_csv(toy_study / artifacts.layer_metrics(layer))
        assert set(table.columns) == LAYER_COLUMNS
    per_feature = pd.read_csv(toy_study / artifacts.PER_FEATURE)
    assert tuple(per_feature.columns) == PER_FEATURE_COLUMNS
    per_layer = pd.read_csv(toy_study / artifacts.PER_LAYER)
    assert tuple(per_layer.columns) == ("layer", "alpha", *(a.name for a in PER_LAYER))
    generation = pd.read_csv(toy_study / artifacts.GENERATION_METRICS)
    assert tuple(generation.columns) == GENERATION_COLUMNS


def test_docs_outputs_lists_every_declared_column():
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "outputs.md").read_text()
    for name in (*PER_FEATURE_COLUMNS, *(a.name for a in PER_LAYER), *GENERATION_COLUMNS, *SCREEN_COLUMNS,
                 *SCREEN_VERIFICATION_COLUMNS, *SCREEN_AGREEMENT_COLUMNS):
        assert f"`{name}`" in text, name
