"""params.yaml -> Config: types, ranges, presets, and errors that name the key."""

from __future__ import annotations

import math

import pytest
import yaml

from pipeline.core.errors import UserError
from pipeline.core.params.config import PRESETS, load_config, parse_params
from tests.conftest import ROOT


def test_the_committed_params_are_the_real_study():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.preset == "gpt2-small"
    assert (cfg.model, cfg.sae_release, cfg.hook, cfg.corpus) == ("gpt2-small", "gpt2-small-res-jb", "resid_post", "wikitext-2")
    assert cfg.layers == tuple(range(12))
    assert (cfg.max_passages, cfg.max_len, cfg.features_per_layer) == (200, 256, 5)
    assert cfg.alpha == 2.0 and cfg.alpha_sweep == (0.0, 0.5, 1.0, 2.0, 4.0)
    assert (cfg.seed, cfg.live_percentile, cfg.batch_size, cfg.device) == (1234, 90.0, 16, "auto")


def test_every_committed_key_is_commented():
    text = (ROOT / "params.yaml").read_text()
    for key in yaml.safe_load(text):
        line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
        assert "#" in line, f"params.yaml: {key} has no comment"


def test_an_int_alpha_from_dvc_set_is_accepted():
    cfg = parse_params({"alpha": 4})
    assert cfg.alpha == 4.0 and isinstance(cfg.alpha, float)


def test_alpha_is_always_in_the_sweep_sorted_and_unique():
    cfg = parse_params({"alpha": 3, "alpha_sweep": [4, 0, 1, 1]})
    assert cfg.alpha_sweep == (0.0, 1.0, 3.0, 4.0)


def test_unknown_key_is_refused_by_name_with_a_suggestion():
    with pytest.raises(UserError, match=r"unknown key 'alpah' \(did you mean 'alpha'\?\)"):
        parse_params({"alpah": 2})


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"alpha": "two"}, r"alpha is 'two' \(str\); it needs a number"),
        ({"alpha": True}, r"alpha is True \(bool\); it needs a number"),
        ({"alpha": float("nan")}, r"alpha is nan; it needs a finite number"),
        ({"alpha_sweep": [0, float("inf")]}, r"alpha_sweep\[1\] is inf"),
        ({"alpha_sweep": []}, r"alpha_sweep is \[\]; allowed: a non-empty list"),
        ({"alpha_sweep": 2}, r"alpha_sweep is 2 \(int\); it needs a list"),
        ({"max_len": 2}, r"max_len is 2; allowed: a value >= 3"),
        ({"max_passages": 0}, r"max_passages is 0; allowed: a value >= 1"),
        ({"max_passages": 2.5}, r"max_passages is 2.5 \(float\); it needs an integer"),
        ({"layers": []}, r"layers is \[\]; allowed: a non-empty list"),
        ({"layers": [1, 1]}, r"each layer once \(duplicated: \[1\]\)"),
        ({"layers": [-1]}, r"layer indices >= 0"),
        ({"features_per_layer": 0}, r"features_per_layer is 0"),
        ({"live_percentile": 101}, r"live_percentile is 101.0; allowed: a value in \[0, 100\]"),
        ({"batch_size": 0}, r"batch_size is 0"),
        ({"preset": "gpt3"}, r"preset is 'gpt3'; allowed: one of gpt2-small, gemma-2-2b, toy"),
        ({"device": "tpu"}, r"device is 'tpu'; allowed: auto, cpu, cuda, cuda:N or mps"),
        ({"dtype": "float64"}, r"dtype is 'float64'; allowed: one of float32, bfloat16, float16"),
        ({"feature_source": "wiki"}, r"feature_source is 'wiki'"),
        ({"min_density": 0.5, "max_density": 0.1}, r"min_density \(0.5\) is above max_density"),
        ({"seed": None}, r"seed is empty; it needs an integer"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, match):
    with pytest.raises(UserError, match=match) as info:
        parse_params(raw)
    assert "\n" not in str(info.value)


def test_null_keys_take_the_preset_and_explicit_keys_win():
    toy = parse_params({"preset": "toy"})
    p = PRESETS["toy"]
    assert (toy.model, toy.sae_release, toy.corpus, toy.feature_source) == (p.model, p.sae_release, p.corpus, p.feature_source)
    assert (toy.max_passages, toy.max_len) == (p.max_passages, p.max_len)
    mine = parse_params({"preset": "toy", "max_passages": 7, "feature_source": "csv"})
    assert mine.max_passages == 7 and mine.feature_source == "csv"


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("alpha: [1, 2\nseed: 3\n")
    with pytest.raises(UserError, match="is not valid YAML at line"):
        load_config(bad)


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_floats_stay_finite_after_parsing():
    cfg = parse_params({"alpha": 0, "alpha_sweep": [0.25]})
    assert all(math.isfinite(a) for a in cfg.alpha_sweep)


def test_params_yaml_lists_every_key_the_config_knows():
    from pipeline.core.params.config import PARAM_SPECS

    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(committed) == list(PARAM_SPECS)  # same keys, same order: params.yaml is the reference
    assert all(field.help for field in PARAM_SPECS.values())
