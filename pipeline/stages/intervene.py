"""Stage `intervene`: every selected feature of every layer x every value of the sweep.

The work (pipeline/shards/intervene.py) runs in shards, in this process or on a cluster as the environment says
(pipeline/executor, docs/cluster.md); any number of shards writes the same bytes. This module checks the inputs,
runs the shards and writes what they return, per layer L: metrics/layers/layer_L.csv (one row per feature x
alpha) and data/detail/layer_L.json; and data/runs/intervene.json. One stage for all layers, like screen and
generate: the model loads once per shard (once in all, by default), and the layers DVC runs are the ones
`layers` resolves to (a preset's every layer when it is null), not a list dvc.yaml would have to repeat. A NaN or
infinite metric that the definitions do not allow stops the stage before anything is written.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.errors import NonFiniteMetricError, UserError
from pipeline.core.io import write_csv, write_json
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import stage_record
from pipeline.executor import ShardWork, run_shards, settings_from_env, stage_fingerprint
from pipeline.shards import intervene as sharded
from pipeline.stats.nan_rules import nan_allowed

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
# A null `layers` is the preset's every layer, so `preset` is read with it (DERIVED_KEYS).
PARAMS = ("layers", "preset", "alpha", "alpha_sweep", "intervention", "live_percentile", "top_k_tokens", "n_snippets",
          "control_draws", "seed", "batch_size", "device", "dtype")

def check_finite(rows: list[dict[str, Any]]) -> None:
    """No metric may be infinite, or NaN except where its definition makes it so (pipeline.stats.nan_rules)."""
    frame = pd.DataFrame(rows)
    allowed = nan_allowed(frame)
    for i, row in enumerate(rows):
        for key, value in row.items():
            if not isinstance(value, float) or math.isfinite(value):
                continue
            if math.isnan(value) and key in allowed and bool(allowed[key].iloc[i]):
                continue
            raise NonFiniteMetricError(
                f"layer {row['layer']} feature {row['feature']} alpha {row['alpha']:g}: {key} is {value}; "
                "the model or SAE produced non-finite numbers (try dtype float32)"
            )


def run_intervene_stage(config: Config | StageParams) -> dict[int, pd.DataFrame]:
    config = StageParams.of(config, "intervene", PARAMS)
    model_record = ModelRecord.read()
    layers = list(config.layers)
    for layer in layers:
        model_record.layer(layer)  # a layer missing from data/model.json is one line, before anything runs
    features = artifacts.read_features(layers)
    counts = {layer: int((features["layer"] == layer).sum()) for layer in layers}
    for layer, n in counts.items():
        if not n:
            raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta().get("passage_documents")
    if documents is None or len(documents) != len(tokens):
        raise UserError(f"{artifacts.TOKENS_META} records no document per passage; rerun the tokenize stage")
    settings = settings_from_env()
    work = ShardWork(
        stage="intervene", fn=sharded.shard, inputs=sharded.InterveneInputs(config.for_checks(), PARAMS),
        specs=sharded.shard_specs(counts, settings.shards),
        fingerprint="" if settings.executor == "local" else stage_fingerprint(
            "intervene", {key: getattr(config, key) for key in PARAMS},
            [artifacts.MODEL_JSON, artifacts.preset_dir(model_record.preset), artifacts.TOKENS,
             artifacts.TOKENS_META, artifacts.FEATURES]))
    with stage_record("intervene", layers=layers) as record:
        run = run_shards(work, settings)
        outputs, record["device"] = sharded.merge(run.results)
        for layer in layers:
            check_finite(outputs[layer].rows)
        frames = {}
        for layer in layers:
            write_json(artifacts.layer_detail(layer), outputs[layer].detail)
            frames[layer] = pd.DataFrame(outputs[layer].rows)
            write_csv(artifacts.layer_metrics(layer), frames[layer])
        record["engine"] = {str(layer): outputs[layer].engine for layer in layers}
        record["executor"] = run.how
    return frames
