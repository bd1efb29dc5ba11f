"""Stage `screen` on the shared toy study: one row per SAE feature, the verification and its agreement figures,
the same bytes for any number of shards; `feature_source: screen` picks what the screen ranks first, with
Neuronpedia labels where the SAE has a source and the corpus's elsewhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core import artifacts
from pipeline.core.columns import (
    SCREEN_AGREEMENT_COLUMNS,
    SCREEN_COLUMNS,
    SCREEN_RANK_COLUMNS,
    SCREEN_VERIFICATION_COLUMNS,
)
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.core.params.config import parse_params
from pipeline.core.plan.layers import LayerPlan
from pipeline.engine.attribution import ScreenLayer, screen
from pipeline.load.tokenizer import ByteTokenizer
from pipeline.sources.neuronpedia_client import Explanation, NeuronpediaFeature
from pipeline.sources.screen import choose_layer, screen_choice
from tests.builders import build_model, build_sae, build_tokens
from tests.conftest import TOY_STUDY_PARAMS, copy_of_toy_study

LAYERS = TOY_STUDY_PARAMS["layers"]


def test_every_feature_of_every_layer_has_one_row_with_its_rank(toy_study):
    for layer in LAYERS:
        table = pd.read_csv(toy_study / artifacts.screen_table(layer))
        table["verified"] = table["verified"].fillna("")
        assert tuple(table.columns) == SCREEN_COLUMNS
        assert list(table["feature"]) == list(range(len(table))) and len(table) == 512  # the toy's d_sae
        assert sorted(table["rank"]) == list(range(1, 513))
        by_rank = table.sort_values("rank")
        assert (np.diff(np.abs(by_rank["slope_delta_ce"].to_numpy())) <= 0).all()
        silent = table["n_firing"] == 0
        assert (table.loc[silent, "slope_delta_ce"] == 0).all() and (table.loc[silent, "rank_per_firing"] == 0).all()
        alpha = TOY_STUDY_PARAMS.get("alpha", 2.0)
        assert np.allclose(table["est_delta_ce"], (alpha - 1) * table["slope_delta_ce"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(table["slope_delta_ce"], table["density"] * table["slope_per_firing"].fillna(0),
                                   rtol=1e-6, atol=1e-12)
        groups = table["verified"].value_counts().to_dict()
        assert groups == {"": 512 - 3 - 8, "top": 3, "random": 8}
        assert set(table.loc[table["verified"] == "top", "rank"]) == {1, 2, 3}


def test_the_verification_runs_every_value_of_the_sweep_and_the_agreement_covers_each_layer_and_alpha(toy_study):
    rows = pd.read_csv(toy_study / artifacts.SCREEN_VERIFICATION)
    assert tuple(rows.columns) == SCREEN_VERIFICATION_COLUMNS
    sweep = parse_params(TOY_STUDY_PARAMS).alpha_sweep
    assert len(rows) == len(LAYERS) * 11 * len(sweep)
    assert (rows.loc[rows["alpha"] == 1.0, ["estimate", "exact"]] == 0).all().all()
    table = pd.read_csv(toy_study / artifacts.SCREEN_AGREEMENT)
    assert tuple(table.columns) == SCREEN_AGREEMENT_COLUMNS
    moved = [a for a in sweep if a != 1.0]
    assert sorted(set(zip(table["layer"], table["alpha"], strict=True))) == [(la, a) for la in LAYERS for a in moved]
    summary = read_json(toy_study / artifacts.SCREEN_AGREEMENT_SUMMARY)
    assert set(summary) == {f"layer_{la}" for la in LAYERS}
    assert set(summary["layer_0"]) == {f"alpha_{a:g}" for a in moved}
    first = table[(table["estimator"] == "estimate") & (table["subset"] == "all")].iloc[0]
    key = summary[f"layer_{first['layer']}"][f"alpha_{first['alpha']:g}"]["all"]
    assert key["spearman"] == pytest.approx(first["spearman"]) and key["top_overlap"] == first["top_overlap"]


def test_the_second_order_estimate_is_verified_beside_the_first_and_is_closer_near_alpha_1(toy_study):
    """screen_estimator: second_order (the default): every verified row has estimate_2, the agreement has both
    estimators, and the curvature term brings the estimate closer to exact at the α nearest 1 (Taylor's theorem:
    the first-order error is O((α-1)^2), the second-order one O((α-1)^3))."""
    assert parse_params(TOY_STUDY_PARAMS).screen_estimator == "second_order"
    rows = pd.read_csv(toy_study / artifacts.SCREEN_VERIFICATION)
    assert rows["estimate_2"].notna().all()
    assert (rows.loc[rows["alpha"] == 1.0, "estimate_2"] == 0).all()
    near = rows[rows["alpha"] == 0.5]
    first_error = (near["estimate"] - near["exact"]).abs()
    second_error = (near["estimate_2"] - near["exact"]).abs()
    assert second_error.median() < first_error.median()
    table = pd.read_csv(toy_study / artifacts.SCREEN_AGREEMENT)
    assert set(table["estimator"]) == {"estimate", "estimate_2"}
    summary = read_json(toy_study / artifacts.SCREEN_AGREEMENT_SUMMARY)
    assert {"all", "random", "all_second_order", "random_second_order"} <= set(summary["layer_0"]["alpha_0.5"])


def test_first_order_only_leaves_estimate_2_empty_and_the_agreement_to_first_order():
    from pipeline.stats.screen_agreement import agreement

    rows = pd.DataFrame({"layer": 0, "feature": range(6), "group": "random", "alpha": 2.0, "n_firing": 3,
                         "density": 0.1, "slope_delta_ce": [1, 2, 3, 4, 5, 6], "estimate": [1., 2, 3, 4, 5, 6],
                         "estimate_2": float("nan"), "exact": [1., 2, 3.5, 4, 5, 7]})
    table = agreement(rows, n_scored=30, top_n=2)
    assert set(table["estimator"]) == {"estimate"} and len(table) == 2  # subsets random and all


def outputs(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for folder in (artifacts.SCREEN_DIR, artifacts.SCREEN_RANKS_DIR) for p in sorted((root / folder).iterdir())}


def test_shards_of_layers_write_the_unsharded_bytes(toy_study, tmp_path, monkeypatch):
    from pipeline.stages.screen import run_screen_stage

    root = copy_of_toy_study(toy_study, tmp_path / "study")
    baseline = outputs(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PIPELINE_SHARDS", "2")
    run_screen_stage(parse_params(TOY_STUDY_PARAMS))
    assert read_json(artifacts.run_record("screen"))["executor"]["n_shards"] == 2
    assert outputs(root) == baseline


def test_feature_source_screen_picks_what_the_screen_ranks_first_in_the_density_band(toy_study, tmp_path, monkeypatch):
    from pipeline.stages.features import run_features_stage

    root = copy_of_toy_study(toy_study, tmp_path / "study")
    monkeypatch.chdir(root)
    config = parse_params(TOY_STUDY_PARAMS | {"feature_source": "screen"})
    chosen = run_features_stage(config)
    assert (chosen["source"] == "screen").all() and chosen["label"].str.startswith("fires on").all()
    for layer in LAYERS:
        table = artifacts.read_screen(layer)
        assert table[list(SCREEN_RANK_COLUMNS)].equals(artifacts.read_screen_ranks(layer))
        band = table[(table["density"] >= config.min_density) & (table["density"] <= config.max_density)
                     & (table["n_firing"] > 0)]
        first = band.sort_values("rank")["feature"].head(config.features_per_layer).tolist()
        assert chosen.loc[chosen["layer"] == layer, "feature"].tolist() == first


def test_feature_source_screen_without_the_screen_is_one_line(toy_study, tmp_path, monkeypatch):
    from pipeline.stages.features import run_features_stage

    root = copy_of_toy_study(toy_study, tmp_path / "study")
    monkeypatch.chdir(root)
    artifacts.screen_ranks(11).unlink()
    with pytest.raises(UserError, match=r"data/screen/layer_11.csv not found; run the screen stage"):
        run_features_stage(parse_params(TOY_STUDY_PARAMS | {"feature_source": "screen"}))


def test_screen_choice_is_the_largest_magnitudes_in_the_band_and_refuses_too_few():
    table = pd.DataFrame({"layer": 4, "feature": range(6), "density": [0.0, 0.01, 0.02, 0.5, 0.03, 0.01],
                          "n_firing": [0, 1, 2, 50, 3, 1], "slope_delta_ce": [0.0, -0.3, 0.1, 9.0, 0.3, 0.05]})
    assert screen_choice(table, 3, 0.001, 0.1) == [1, 4, 2]  # 3 is outside the band; a tie goes to the lower index
    with pytest.raises(UserError, match=r"layer 4: only 4 features .* features_per_layer=5"):
        screen_choice(table, 5, 0.001, 0.1)


class StubNeuronpedia:
    """Answers like NeuronpediaClient.feature: an explanation for even indices, a record without one for odd."""

    def feature(self, model_id, source, index):
        explanations = (Explanation(f"explained {index}", "stub", 0.9),) if index % 2 == 0 else ()
        return NeuronpediaFeature(model_id, source, index, 0.01, 1.0, explanations, (("a", 1.0),), (("b", -1.0),))


def test_labels_come_from_neuronpedia_where_the_sae_has_a_source_and_from_the_corpus_elsewhere():
    model = build_model(d_vocab=257)
    sae = build_sae(enc_bias=-0.6)
    tokens = build_tokens(n=5, t=12, d_vocab=257, bos=256)
    plan = LayerPlan(layer=1, hook="blocks.1.hook_resid_post", resume_at=2, sae_release="r", sae_id="x",
                     neuronpedia="gpt2-small/1-res-jb")
    layer_screen = screen(model, [ScreenLayer(1, sae, 2)], tokens).layers[1]
    table = layer_screen.table(2.0)
    with torch.no_grad():
        chosen = choose_layer(model, sae, plan, table, tokens.numpy(), ByteTokenizer(), 4, 0.0, 1.0, 2,
                              StubNeuronpedia())
    assert [c.feature for c in chosen] == table[table["n_firing"] > 0].sort_values("rank")["feature"].head(4).tolist()
    for c in chosen:
        if c.feature % 2 == 0:
            assert c.label == f"explained {c.feature}" and "Neuronpedia (stub)" in c.reason and c.np_pos_tokens
        else:
            assert c.label.startswith("fires on") and "no explanation" in c.reason
        assert c.neuronpedia_url.endswith(f"/gpt2-small/1-res-jb/{c.feature}")
    plan_without = LayerPlan(layer=1, hook=plan.hook, resume_at=2, sae_release="r", sae_id="x", neuronpedia=None)
    alone = choose_layer(model, sae, plan_without, table, tokens.numpy(), ByteTokenizer(), 4, 0.0, 1.0, 2, None)
    assert all(c.label.startswith("fires on") and not c.neuronpedia_url for c in alone)
