"""Stage `screen`: every feature of every studied layer, estimated, and a sample of them verified exactly.

The work (pipeline/shards/screen.py) runs in shards of layers, in this process or on a cluster as the environment
says (pipeline/executor, docs/cluster.md); any number of shards writes the same bytes. This module checks the
inputs, runs the shards and writes what they return (docs/screen.md, docs/outputs.md):

- metrics/screen/layer_L.csv: one row per SAE feature of layer L, its first-order estimate of the `scale`
  intervention's delta_ce (the slope in alpha at alpha = 1, and the estimate at the headline alpha), its rank by
  magnitude and the per-firing-position reading;
- metrics/screen/verification.csv: the verified features' estimate beside the engine's exact delta_ce at every
  value of the sweep;
- metrics/screen/agreement.csv and agreement.json: the agreement figures per (layer, alpha), the JSON for
  `dvc metrics diff --targets metrics/screen/agreement.json` (not in summary.json, so `dvc exp show` stays narrow);
- data/screen/layer_L.csv: the per-layer tables without the headline alpha's columns, which `features` reads.

One stage for all layers, like `generate`: one forward and one backward pass serve every layer.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.columns import SCREEN_AGREEMENT_SUMMARY, SCREEN_ESTIMATES
from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import stage_record
from pipeline.executor import ShardWork, run_shards, settings_from_env, split_evenly, stage_fingerprint
from pipeline.shards import screen as sharded
from pipeline.stats.screen_agreement import agreement

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
# No `intervention`: the screen estimates the `scale` intervention whatever the study runs (docs/screen.md).
# `preset` with `layers`: a null `layers` is the preset's every layer.
PARAMS = ("layers", "preset", "alpha", "alpha_sweep", "screen_top_k", "screen_random", "screen_estimator", "seed",
          "batch_size", "device", "dtype")
FIRST_ORDER = SCREEN_ESTIMATES["first_order"]
ESTIMATE_NAMES = {column: name for name, column in SCREEN_ESTIMATES.items()}
SCALE_IDENTITY = 1.0  # alpha = 1 is the clean model: estimate and exact are both 0 there


def agreement_summary(table: pd.DataFrame) -> dict[str, Any]:
    """metrics/screen/agreement.json: layer -> alpha -> subset -> the first-order estimate's headline figures, and
    subset + "_second_order" -> the second-order estimate's where it was verified."""
    out: dict[str, Any] = {}
    for row in table.itertuples(index=False):
        figures = {key: getattr(row, key) for key in SCREEN_AGREEMENT_SUMMARY}
        figures = {key: None if isinstance(v, float) and math.isnan(v) else v for key, v in figures.items()}
        name = row.subset if row.estimator == FIRST_ORDER else f"{row.subset}_{ESTIMATE_NAMES[row.estimator]}"
        out.setdefault(f"layer_{row.layer}", {}).setdefault(f"alpha_{row.alpha:g}", {})[name] = figures
    return out


def run_screen_stage(config: Config | StageParams) -> dict[int, pd.DataFrame]:
    config = StageParams.of(config, "screen", PARAMS)
    model_record = ModelRecord.read()
    for layer in config.layers:
        model_record.layer(layer)  # a layer missing from data/model.json is one line, before anything runs
    tokens = artifacts.read_tokens()
    if tokens.shape[1] < 3:
        raise UserError(f"{artifacts.TOKENS} has passages of {tokens.shape[1]} tokens; the screen needs max_len >= 3")

    with stage_record("screen", layers=list(config.layers)) as record:
        settings = settings_from_env()
        layers = list(config.layers)
        work = ShardWork(
            stage="screen", fn=sharded.layer_block, inputs=sharded.ScreenInputs(config.for_checks(), PARAMS),
            specs=[{"layers": layers[block.start:block.stop]} for block in split_evenly(len(layers), settings.shards)],
            fingerprint="" if settings.executor == "local" else stage_fingerprint(
                "screen", {key: getattr(config, key) for key in PARAMS},
                [artifacts.MODEL_JSON, artifacts.preset_dir(model_record.preset), artifacts.TOKENS]))
        run = run_shards(work, settings)
        merged = sharded.merge(run.results)
        n_scored = next(iter(merged.screens.values())).n_scored
        table = agreement(merged.verification, n_scored, top_n=max(config.screen_top_k, 1), identity=SCALE_IDENTITY)
        tables = {layer: s.table(config.alpha, merged.picked[layer]) for layer, s in merged.screens.items()}
        artifacts.write_screen(tables, merged.verification, table, agreement_summary(table))
        record.update(merged.how, executor=run.how, n_scored=n_scored,
                      d_sae={layer: s.d_sae for layer, s in merged.screens.items()})
    return tables
