"""Sharding changes no byte: blocks of features (intervene) and of layers (generate) merge into exactly
what one shard over everything writes, with the executor in this process (local) and through submitit's
in-process `debug` cluster, whose finished shards are stored and reused.

The engine is checked on random models, every array bit for bit; the stages on a random toy study, every
output file byte for byte. The subprocess runs (submitit's `local` cluster, faults, interruptions, DVC)
are in tests/e2e/test_shards_submitit.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.core import artifacts
from pipeline.core.io import read_json
from pipeline.core.params.config import parse_params
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.interventions import ADD, CLAMP, SCALE
from pipeline.engine.run import _per_feature_batches, run_layer
from pipeline.executor import split_evenly
from pipeline.shards.intervene import FeatureColumns
from tests.builders import build_model, build_sae, build_tokens

RESUME = 2  # blocks.1.hook_resid_post of the 3-layer test model


# ---- the pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_items", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 20])
def test_split_evenly_covers_every_item_once_in_order_in_near_equal_blocks(n_items, n_shards):
    blocks = split_evenly(n_items, n_shards)
    assert [i for b in blocks for i in b] == list(range(n_items))
    assert len(blocks) == min(n_items, n_shards)
    sizes = [len(b) for b in blocks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("counts", [{0: 5}, {0: 5, 6: 5, 11: 5}, {3: 1, 4: 2, 9: 5}, {0: 3, 1: 3}])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 7, 40])
def test_intervene_shards_cover_every_feature_once_in_layer_and_feature_order(counts, n_shards):
    from pipeline.shards.intervene import shard_specs

    specs = shard_specs(counts, n_shards)
    covered = [(layer, p) for spec in specs for layer in spec["layers"]
               for p in spec.get("features", range(counts[layer]))]
    assert covered == [(layer, p) for layer, n in counts.items() for p in range(n)]
    assert len(specs) == min(n_shards, sum(counts.values()))
    if n_shards <= len(counts):  # whole layers, the model loaded once per shard
        assert all("features" not in spec for spec in specs)
    else:  # each layer cut into blocks; a block never holds two layers
        assert all(len(spec["layers"]) == 1 for spec in specs)


def test_per_feature_batches_never_mix_features_and_match_each_features_own_batches():
    rng = random.Random(0)
    for _ in range(200):
        bs = rng.randint(1, 9)
        rows = [(f, rng.randint(0, 3), 0, rng.randint(0, 5), 1) for f in range(rng.randint(1, 5))
                for _ in range(rng.randint(0, 20))]
        batches = _per_feature_batches(rows, bs)
        assert [r for b in batches for r in b] == rows
        assert all(1 <= len(b) <= bs and len({r[0] for r in b}) == 1 for b in batches)
        for f in {r[0] for r in rows}:  # a feature's batches do not depend on the other features' rows
            alone = _per_feature_batches([r for r in rows if r[0] == f], bs)
            assert [b for b in batches if b[0][0] == f] == alone


def test_feature_columns_are_the_whole_encoders_columns_bit_for_bit():
    sae = build_sae(d_sae=64, enc_bias=-0.3)
    whole = FeatureEncoder(sae, [3, 9, 17, 40, 41])
    resid = torch.randn(4, 11, 16)
    full = whole(resid)
    for positions in ([0], [1, 3], [4, 2, 0]):
        block = FeatureColumns(whole, positions)
        assert torch.equal(block(resid), full[..., positions])
        assert torch.equal(block.directions, whole.directions[positions])


@pytest.mark.parametrize("intervention", [SCALE, CLAMP, ADD], ids=lambda i: i.name)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_blocks_of_features_give_the_whole_layers_arrays_bit_for_bit(intervention, batch_size):
    """Every array a block of features gets from the engine is its part of the whole layer's run. At these
    widths, encoding a block's features alone (FeatureEncoder of the block) rounds some activations
    differently on this repo's CPU: hence FeatureColumns."""
    model = build_model(d_model=64, d_head=32, d_mlp=256, d_vocab=257, n_ctx=40)
    sae = build_sae(d_in=64, d_sae=256, enc_bias=-0.2)
    tokens = build_tokens(n=9, t=40, d_vocab=257)
    features = [5, 11, 2, 30, 47]
    values = [0.0, 1.0, 2.5]
    whole = FeatureEncoder(sae, features)

    def run(positions):
        subset = [features[p] for p in positions]
        controls = random_unit_directions(7, 1, subset, 2, 64)
        return run_layer(model, sae, RESUME, tokens, subset, values, intervention=intervention, batch_size=batch_size,
                         controls=controls, encoder=FeatureColumns(whole, positions))

    everything = run(list(range(len(features))))
    assert everything.stats.rows_run > 0
    for block in split_evenly(len(features), 3):
        part = run(list(block))
        sl = slice(block.start, block.stop)
        for name in ("ce_int", "kl", "ctrl_ce_int", "ctrl_kl", "delta_sum"):
            assert np.array_equal(getattr(part, name), getattr(everything, name)[sl], equal_nan=True), name
        assert np.array_equal(part.acts, everything.acts[..., sl])
        assert np.array_equal(part.ce_clean, everything.ce_clean)
        for mine, theirs in zip(part.live, everything.live[sl], strict=True):
            assert mine.threshold == theirs.threshold and np.array_equal(mine.mask, theirs.mask)


def test_the_default_encoder_is_the_feature_encoder_of_the_features():
    model, sae, tokens = build_model(), build_sae(), build_tokens()
    plain = run_layer(model, sae, RESUME, tokens, [4, 8], [0.0, 2.0], batch_size=3)
    given = run_layer(model, sae, RESUME, tokens, [4, 8], [0.0, 2.0], batch_size=3,
                      encoder=FeatureColumns(FeatureEncoder(sae, [4, 8]), [0, 1]))
    for name in ("ce_int", "kl", "delta_sum", "acts"):
        assert np.array_equal(getattr(plain, name), getattr(given, name)), name


# ---- the stages on a random toy study --------------------------------------------------------------------

LAYERS = [0, 6, 11]
BASE = {"preset": "toy", "layers": LAYERS, "max_passages": 6, "max_len": 20, "features_per_layer": 5,
        "toy_lm_steps": 0, "toy_sae_steps": 0, "max_density": 0.5, "control_draws": 2, "batch_size": 4,
        "generate_tokens": 4, "generate_prompts": ["The", "x = "], "generate_alphas": [0, 4]}
OUTPUTS = [*(artifacts.layer_metrics(layer) for layer in LAYERS), *(artifacts.layer_detail(layer) for layer in LAYERS),
           artifacts.GENERATION_METRICS, artifacts.GENERATIONS]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A directory with the model, tokens and features of a random toy study, and the bytes the unsharded
    (default, in-process) intervene and generate write there."""
    from pipeline.stages.features import run_features_stage
    from pipeline.stages.model import run_model_stage
    from pipeline.stages.tokenize import run_tokenize_stage

    root = tmp_path_factory.mktemp("shards")
    config = parse_params(BASE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in list(__import__("os").environ):
            if name.startswith("PIPELINE_"):
                mp.delenv(name)
        run_model_stage(config)
        run_tokenize_stage(config)
        run_features_stage(config)
        baseline = run_both(config)
    return root, baseline


def run_both(config) -> dict[str, bytes]:
    from pipeline.stages.generate import run_generate_stage
    from pipeline.stages.intervene import run_intervene_stage

    for path in OUTPUTS:
        path.unlink(missing_ok=True)
    run_intervene_stage(config)
    run_generate_stage(config)
    return {str(path): path.read_bytes() for path in OUTPUTS}


@pytest.fixture
def in_toy(toy, monkeypatch):
    root, baseline = toy
    monkeypatch.chdir(root)
    for name in list(__import__("os").environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    return root, baseline


@pytest.mark.parametrize("shards", [2, 3, 5, 7])
def test_shards_run_here_write_the_unsharded_bytes(in_toy, monkeypatch, shards):
    """Blocks of layers (2, 3 shards) and blocks of one layer's features (5, 7) write the same bytes."""
    root, baseline = in_toy
    monkeypatch.setenv("PIPELINE_SHARDS", str(shards))
    assert run_both(parse_params(BASE)) == baseline
    record = read_json(artifacts.run_record("intervene"))
    assert record["executor"]["n_shards"] == shards and record["layers"] == LAYERS
    assert read_json(artifacts.run_record("generate"))["executor"]["n_shards"] == min(shards, len(LAYERS))


def test_submitits_debug_cluster_stores_the_shards_and_a_rerun_reuses_them(in_toy, monkeypatch, tmp_path):
    root, baseline = in_toy
    monkeypatch.setenv("PIPELINE_EXECUTOR", "submitit")
    monkeypatch.setenv("PIPELINE_SUBMITIT_CLUSTER", "debug")
    monkeypatch.setenv("PIPELINE_SHARDS", "3")
    monkeypatch.setenv("PIPELINE_EXECUTOR_DIR", str(tmp_path / "executor"))
    assert run_both(parse_params(BASE)) == baseline
    first = read_json(artifacts.run_record("intervene"))["executor"]
    assert (first["n_shards"], first["reused"]) == (3, 0)
    stored = sorted((tmp_path / "executor/store/intervene").glob("*.pkl"))
    assert [p.stem for p in stored] == sorted(first["keys"])

    assert run_both(parse_params(BASE)) == baseline  # everything from the store
    again = read_json(artifacts.run_record("intervene"))["executor"]
    assert again["reused"] == 3 and again["keys"] == first["keys"]
    assert read_json(artifacts.run_record("generate"))["executor"]["reused"] == 3

    # a param the stage reads changes every key: nothing is reused, and the result differs
    changed = parse_params(BASE | {"live_percentile": 50})
    from pipeline.stages.intervene import run_intervene_stage

    run_intervene_stage(changed)
    other = read_json(artifacts.run_record("intervene"))["executor"]
    assert other["reused"] == 0 and not set(other["keys"]) & set(first["keys"])
    assert artifacts.layer_metrics(0).read_bytes() != baseline[str(artifacts.layer_metrics(0))]


def test_a_changed_input_file_is_never_served_from_the_store(in_toy, monkeypatch, tmp_path):
    from pipeline.stages.intervene import run_intervene_stage

    root, baseline = in_toy
    monkeypatch.setenv("PIPELINE_EXECUTOR", "submitit")
    monkeypatch.setenv("PIPELINE_SUBMITIT_CLUSTER", "debug")
    monkeypatch.setenv("PIPELINE_SHARDS", "2")
    monkeypatch.setenv("PIPELINE_EXECUTOR_DIR", str(tmp_path / "executor"))
    config = parse_params(BASE)
    run_intervene_stage(config)
    keys = read_json(artifacts.run_record("intervene"))["executor"]["keys"]
    tokens = np.load(artifacts.TOKENS)
    try:
        np.save(artifacts.TOKENS, tokens[::-1].copy())  # the same passages in another order
        run_intervene_stage(config)
        record = read_json(artifacts.run_record("intervene"))["executor"]
        assert record["reused"] == 0 and not set(record["keys"]) & set(keys)
    finally:
        np.save(artifacts.TOKENS, tokens)
