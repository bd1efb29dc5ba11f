"""Stage `generate` on a small random toy study: its outputs, its params, its one-line errors; the
generation measures on hand-made inputs; aggregate's generation summary."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.core import artifacts, columns
from pipeline.core.errors import UserError
from pipeline.core.io import read_json, write_csv
from pipeline.core.params.config import parse_params
from pipeline.engine.generation_metrics import MEASURES, distinct_n, per_row, repetition, summary_row
from tests.conftest import ROOT, run_cli

LAYERS = [0, 11]
BASE = {"preset": "toy", "layers": LAYERS, "max_passages": 4, "max_len": 16, "features_per_layer": 2,
        "toy_lm_steps": 0, "toy_sae_steps": 0, "max_density": 0.5, "generate_tokens": 5,
        "generate_prompts": ["The", "x = "]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A directory with the model, tokens and features of a random toy study (the generate stage's inputs)."""
    from pipeline.stages.features import run_features_stage
    from pipeline.stages.model import run_model_stage
    from pipeline.stages.tokenize import run_tokenize_stage

    root = tmp_path_factory.mktemp("generate")
    config = parse_params(BASE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_model_stage(config)
        run_tokenize_stage(config)
        run_features_stage(config)
    return root


def run(toy, monkeypatch, **params):
    from pipeline.stages.generate import run_generate_stage

    monkeypatch.chdir(toy)
    return run_generate_stage(parse_params(BASE | params))


def test_the_stage_writes_a_row_per_layer_feature_value_and_decoding(toy, monkeypatch):
    frame = run(toy, monkeypatch, generate_alphas=[1, 0, 8])
    assert tuple(frame.columns) == columns.GENERATION_COLUMNS
    assert len(frame) == len(LAYERS) * 2 * 3 * 2
    assert set(frame["decoding"]) == {"greedy", "sampled"}
    on_disk = artifacts.read_generation_metrics()
    assert len(on_disk) == len(frame)
    # at the identity the steered text is the clean text, so every measure equals its clean column
    ident = frame[frame["alpha"] == 1.0]
    assert (ident["frac_changed"] == 0).all()
    for m in MEASURES:
        assert np.allclose(ident[m], ident[f"{m}_clean"], equal_nan=True), m
    gens = read_json(toy / artifacts.GENERATIONS)
    assert [d["layer"] for d in gens["layers"]] == LAYERS and gens["alphas"] == [0.0, 1.0, 8.0]
    layer = gens["layers"][0]
    assert all(len(r["tokens"]) == 5 for r in layer["rows"])
    assert all(p["tokens"][0] == "<bos>" for p in layer["prompts"])
    for f in layer["features"]:  # the top-activating context ends on the token where the feature fires
        if f["context"] is not None:
            passage, position = f["context"]["passage"], f["context"]["position"]
            tokens = np.load(toy / artifacts.TOKENS)[passage, :position + 1]
            prompt = layer["prompts"][f["context_prompt"]]["tokens"]
            assert prompt[-1] == chr(tokens[-1]) or prompt[-1].startswith("\\x")
    record = read_json(toy / artifacts.run_record("generate"))
    assert record["tokens_generated"] == 5 * sum(len(d["rows"]) for d in gens["layers"])


def test_sampled_continuations_are_reproducible_from_the_seed(toy, monkeypatch):
    small = {"layers": [11], "generate_alphas": [4], "generate_prompts": ["x = "], "generate_tokens": 3}
    run(toy, monkeypatch, **small)
    first = (toy / artifacts.GENERATIONS).read_bytes()
    run(toy, monkeypatch, **small)
    assert (toy / artifacts.GENERATIONS).read_bytes() == first
    run(toy, monkeypatch, **small, seed=99)
    assert (toy / artifacts.GENERATIONS).read_bytes() != first


def test_generate_alphas_default_to_the_sweep_as_written_without_the_identity():
    assert parse_params({}).generate_alphas == (0.0, 0.5, 2.0, 4.0)
    assert parse_params({"alpha": 3.0}).generate_alphas == (0.0, 0.5, 2.0, 4.0)  # not the headline alpha
    assert parse_params({"intervention": "clamp"}).generate_alphas == (0.0, 0.5, 1.0, 2.0, 4.0)
    assert parse_params({"generate_alphas": [4, 1, 4]}).generate_alphas == (1.0, 4.0)


def test_a_stage_reading_generate_alphas_must_declare_what_resolves_it():
    from pipeline.core.params.stage_params import StageParams

    view = StageParams(parse_params({}), "generate", ("generate_alphas",))
    with pytest.raises(AttributeError, match="alpha_sweep"):
        _ = view.generate_alphas


@pytest.mark.parametrize(("params", "message"), [
    ({"generate_prompts": []}, "generate_prompts is []; allowed: a non-empty list"),
    ({"generate_prompts": ["The", ""]}, "generate_prompts[1] is '' (str); it needs a non-empty string"),
    ({"generate_prompts": "The"}, "generate_prompts is 'The' (str); it needs a list of strings"),
    ({"generate_tokens": 0}, "generate_tokens is 0; allowed: a value >= 1"),
    ({"generate_temperature": 0}, "generate_temperature is 0.0; allowed: a number > 0"),
])
def test_bad_generation_params_are_one_line_naming_the_key(params, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_params(params)


def test_the_command_line_says_it_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("preset: toy\ngenerate_tokens: 0\n")
    proc = run_cli(["generate"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params.yaml: generate_tokens is 0; allowed: a value >= 1"


def test_a_prompt_longer_than_the_context_is_refused_by_name(toy, monkeypatch):
    with pytest.raises(UserError, match=r"generate_prompts\[1\] \('aaaa.*is 121 tokens with BOS; with generate_tokens 8 "
                                        r"it needs at most 128"):
        run(toy, monkeypatch, generate_prompts=["The", "a" * 120], generate_tokens=8)


def test_an_empty_generate_alphas_is_refused(toy, monkeypatch):
    with pytest.raises(UserError, match="generate_alphas is empty"):
        run(toy, monkeypatch, alpha_sweep=[1.0], alpha=1.0)


# ---- the measures, by hand

def test_distinct_n_and_repetition():
    assert distinct_n([1, 2, 3, 4], 1) == 1.0
    assert distinct_n([1, 1, 1, 1], 1) == 0.25
    assert distinct_n([1, 2, 1, 2, 1], 2) == 2 / 4
    assert math.isnan(distinct_n([1], 2))
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == 1 - 4 / 5  # 4-grams 1234 2341 3412 4123 1234
    assert repetition([5, 6, 7, 8, 9]) == 0.0
    assert math.isnan(repetition([1, 2, 3]))


def test_per_row_and_summary_row_on_hand_made_continuations():
    generated = np.array([[1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4]])
    acts = np.zeros((3, 4, 2))
    acts[1, :2, 0] = [2.0, 4.0]  # feature 0 fires on two tokens of row 1
    nll = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0], [2.0, 0.0, 2.0, 0.0]])
    m = per_row(generated, acts, nll, promoted=[{1}, {4, 9}])
    assert m["concept_act"][1].tolist() == [1.5, 0.0] and m["concept_frac"][1].tolist() == [0.5, 0.0]
    assert m["loss"].tolist() == [1.0, 3.0, 1.0]
    assert m["promoted_frac"][:, 0].tolist() == [0.25, 1.0, 0.25] and m["promoted_frac"][0, 1] == 0.25
    row = summary_row(m, steered=[1, 2], clean=[0, 0], feature=0, generated=generated)
    assert row["n_prompts"] == 2 and row["concept_act"] == 0.75 and row["concept_act_clean"] == 0.0
    assert row["loss"] == 2.0 and row["loss_clean"] == 1.0
    assert row["frac_changed"] == 0.5  # row 2 is row 0's text


def test_the_measures_are_the_artifacts_columns():
    assert MEASURES == tuple(m.name for m in columns.GENERATION_MEASURES)


def test_aggregate_summarises_the_sampled_rows_per_value(tmp_path, monkeypatch):
    from pipeline.stages.aggregate import generation_summary

    monkeypatch.chdir(tmp_path)
    rows = [{c: 0.0 for c in columns.GENERATION_COLUMNS} | {"layer": layer, "feature": f, "alpha": a,
            "intervention": "scale", "decoding": d, "concept_act": a * (f + 1) + (d == "greedy") * 100}
            for layer in (2, 5) for f in (0, 1) for a in (0.0, 4.0) for d in ("greedy", "sampled")]
    write_csv(artifacts.GENERATION_METRICS, pd.DataFrame(rows)[list(columns.GENERATION_COLUMNS)])
    out = generation_summary((2, 5))
    assert out["decoding"] == "sampled" and out["n_features"] == 4
    assert out["by_alpha"]["alpha_4"]["concept_act"] == 6.0 and out["by_alpha"]["alpha_0"]["concept_act"] == 0.0
    with pytest.raises(UserError, match="stale"):
        generation_summary((2, 5, 7))


def test_the_stage_is_in_dvc_yaml_without_alpha():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["generate"]
    assert "alpha" not in stage["params"] and "foreach" not in stage
    assert {str(artifacts.GENERATION_METRICS), str(artifacts.GENERATIONS)} <= set(stage["outs"])


def test_the_report_shows_the_features_whose_steering_changed_the_text_most():
    from pipeline.report.generation import shown_features

    rows = [{c: 0.0 for c in columns.GENERATION_COLUMNS} | {"layer": 3, "feature": f, "alpha": a, "decoding": d,
            "frac_changed": changed, "concept_act": gain * a}
            for f, changed, gain in [(10, 0.5, 0.0), (11, 0.0, 9.0), (12, 0.5, 1.0), (13, 1.0, 0.0)]
            for a in (0.0, 4.0) for d in ("greedy", "sampled")]
    assert shown_features(pd.DataFrame(rows), 3, n=3) == [13, 12, 10]
