"""Unit tests of the plan's forward-pass count: the numbers it reports equal the rule in its docstring
and what the engine really does on a tiny model."""

from __future__ import annotations

import math

import pytest

from pipeline.core.params.config import parse_params
from pipeline.core.plan.show import forward_passes
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.run import run_layer
from tests.builders import build_model, build_sae, build_tokens

CONFIGS = {
    # alpha_sweep with the identity 1: it needs no forward pass; batches divide the passages
    "scale_with_identity": dict(layers=[0, 2], features_per_layer=2, alpha=2.0, alpha_sweep=[0.0, 1.0, 2.0],
                                max_passages=6, max_len=10, batch_size=3),
    # no identity value in the sweep, a ragged last batch
    "scale_without_identity": dict(layers=[1], features_per_layer=3, alpha=4.0, alpha_sweep=[0.5],
                                   max_passages=5, max_len=8, batch_size=2),
    # clamp has no identity value: every value runs
    "clamp": dict(layers=[0, 1, 2], features_per_layer=1, alpha=2.0, alpha_sweep=[0.0, 1.0], intervention="clamp",
                  max_passages=4, max_len=6, batch_size=4),
    # add's identity is 0
    "add": dict(layers=[1], features_per_layer=2, alpha=1.0, alpha_sweep=[0.0, -1.0], intervention="add",
                max_passages=7, max_len=7, batch_size=16),
}


def config(name):
    return parse_params({"preset": "toy", **CONFIGS[name]})


def identity_of(cfg):
    return INTERVENTIONS[cfg.intervention].identity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reported_counts_follow_the_rule_in_the_docstring(name):
    cfg = config(name)
    n_layers, f, n, b = len(cfg.layers), cfg.features_per_layer, cfg.max_passages, cfg.batch_size
    values = list(cfg.alpha_sweep)
    non_identity = [v for v in values if v != identity_of(cfg)]
    blocks = math.ceil(n / b)
    fp = forward_passes(cfg)
    assert fp["clean_prefix_passes"] == n_layers * n  # one prefix per passage per layer
    assert fp["clean_suffix_passes"] == n_layers * n  # one clean suffix per passage per layer
    rows_per = 1 + cfg.control_draws  # the feature's row and its random-direction controls
    assert fp["intervened_suffix_passes_max"] == n_layers * f * len(non_identity) * n * rows_per
    # per block of b passages: the prefix call, the clean suffix call, at most one call per (feature, value, draw)
    assert fp["batched_calls_max"] == n_layers * blocks * (2 + f * len(non_identity) * rows_per)
    assert fp["plain_full_passes"] == n_layers * (f * len(values) * n + n)
    assert fp["tokens_per_pass"] == cfg.max_len
    # the screen's exact verification: its features x the scale sweep without alpha = 1, per passage and layer
    scale_moves = [v for v in values if v != 1.0]
    assert fp["screen_suffix_passes_max"] == n_layers * (cfg.screen_top_k + cfg.screen_random) * len(scale_moves) * n


def test_the_headline_alpha_joins_the_sweep_and_is_counted():
    cfg = parse_params({"preset": "toy", "layers": [0], "features_per_layer": 1, "alpha": 3.0,
                        "alpha_sweep": [1.0], "max_passages": 2, "batch_size": 2})
    assert cfg.alpha_sweep == (1.0, 3.0)
    assert forward_passes(cfg)["intervened_suffix_passes_max"] == 1 * 1 * 1 * 2 * (1 + cfg.control_draws)  # only alpha 3


def run_engine(cfg, enc_bias: float, shortcuts: bool = True, controls: bool = True):
    """run_layer for every layer of cfg on a tiny model, passages of max_len tokens (with cfg's control draws
    unless `controls` is False: the plain way has none)."""
    model = build_model(n_ctx=cfg.max_len)
    tokens = build_tokens(n=cfg.max_passages, t=cfg.max_len)
    features = list(range(cfg.features_per_layer))
    results = []
    for layer in cfg.layers:
        sae = build_sae(hook_name=f"blocks.{layer}.hook_resid_post", enc_bias=enc_bias, seed=layer)
        draws = cfg.control_draws if controls else 0
        directions = random_unit_directions(cfg.seed, layer, features, draws, model.cfg.d_model)
        results.append(run_layer(model, sae, layer + 1, tokens, features, list(cfg.alpha_sweep),
                                 intervention=INTERVENTIONS[cfg.intervention], batch_size=cfg.batch_size,
                                 shortcuts=shortcuts, controls=directions))
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_engine_does_as_many_passes_as_reported_when_every_feature_fires_everywhere(name):
    cfg = config(name)
    fp = forward_passes(cfg)
    results = run_engine(cfg, enc_bias=20.0)  # ReLU features firing at every position
    for res in results:
        assert (res.acts[:, 1:] > 0).all(), "precondition: every feature fires at every position"
    n, b, f = cfg.max_passages, cfg.batch_size, cfg.features_per_layer
    active = len([v for v in cfg.alpha_sweep if v != identity_of(cfg)])
    block_sizes = [min(b, n - b0) for b0 in range(0, n, b)]
    assert all(r.stats.prefix_calls == len(block_sizes) for r in results)  # each passage through the prefix once
    assert sum(r.stats.rows_run for r in results) == fp["intervened_suffix_passes_max"]
    # per block: one clean suffix call, then the block's f * active * bp variant rows (and as many per
    # control draw) b at a time
    per = 1 + cfg.control_draws
    expected_suffix_calls = sum(1 + math.ceil(f * active * bp * per / b) for bp in block_sizes)
    assert all(r.stats.suffix_calls == expected_suffix_calls for r in results)
    calls = sum(r.stats.prefix_calls + r.stats.suffix_calls for r in results)
    assert calls <= fp["batched_calls_max"]
    if n % b == 0:  # full blocks reach the bound
        assert calls == fp["batched_calls_max"]


def changes_something(intervention: str, acts, value: float) -> bool:
    """Whether an intervention at `value` moves any non-BOS position of a passage (acts: [T])."""
    after_bos = acts[1:]
    if intervention == "scale":
        return value != 1.0 and bool((after_bos != 0).any())
    if intervention == "clamp":
        return bool((after_bos != value).any())
    return value != 0.0  # add


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_engine_skips_exactly_the_passages_where_a_feature_changes_nothing(name):
    cfg = config(name)
    fp = forward_passes(cfg)
    results = run_engine(cfg, enc_bias=-0.6)  # sparse features: silent in some passages
    expected = sum(changes_something(cfg.intervention, res.acts[p, :, fi], v)
                   for res in results for fi in range(cfg.features_per_layer)
                   for v in cfg.alpha_sweep for p in range(cfg.max_passages))
    rows = sum(r.stats.rows_run for r in results)
    assert rows == expected * (1 + cfg.control_draws)  # a control changes exactly where its feature does
    assert rows <= fp["intervened_suffix_passes_max"]
    calls = sum(r.stats.prefix_calls + r.stats.suffix_calls for r in results)
    assert calls <= fp["batched_calls_max"]


def test_some_feature_is_silent_in_some_passage_with_the_sparse_sae():
    """The sparse case above really exercises the skipping (it is not the all-firing case again)."""
    cfg = config("scale_without_identity")
    results = run_engine(cfg, enc_bias=-0.6)
    assert sum(r.stats.rows_run for r in results) < forward_passes(cfg)["intervened_suffix_passes_max"]


@pytest.mark.parametrize("name", ["scale_with_identity", "add"])
def test_the_plain_way_runs_every_feature_value_and_passage_plus_one_clean_pass(name):
    cfg = config(name)
    results = run_engine(cfg, enc_bias=20.0, shortcuts=False, controls=False)
    n = cfg.max_passages
    assert sum(r.stats.rows_run + n for r in results) == forward_passes(cfg)["plain_full_passes"]
