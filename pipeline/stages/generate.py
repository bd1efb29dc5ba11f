"""Stage `generate`: what the model writes with each feature turned up, beside the clean model's text.

The work (pipeline/shards/generate.py) runs in shards of layers, in this process or on a cluster as the
environment says (pipeline/executor, docs/cluster.md); any number of shards writes the same bytes. This module
checks the inputs, runs the shards and writes what they return: metrics/generation.csv (one row per layer,
feature, alpha and decoding), data/generations.json (the texts, token by token, with the feature's activation at
each generated token) and data/runs/generate.json. One stage for all layers: the model loads once per shard, each
layer's SAE in turn, and the work per layer is small (a process start alone costs seconds).
"""

from __future__ import annotations

import pandas as pd

from pipeline.core import artifacts, columns
from pipeline.core.errors import UserError
from pipeline.core.io import write_json
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import stage_record
from pipeline.executor import ShardWork, run_shards, settings_from_env, split_evenly, stage_fingerprint
from pipeline.load import load_tokenizer
from pipeline.shards import generate as sharded

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
# alpha_sweep and intervention: a null generate_alphas is the sweep (as written) minus the identity; `preset`
# with `layers`: a null `layers` is the preset's every layer.
PARAMS = ("layers", "preset", "generate_alphas", "alpha_sweep", "intervention", "generate_tokens",
          "generate_temperature", "generate_prompts", "generate_batch_size", "top_k_tokens", "seed", "batch_size",
          "device", "dtype")


def run_generate_stage(config: Config | StageParams) -> pd.DataFrame:
    config = StageParams.of(config, "generate", PARAMS)
    if not config.generate_alphas:
        raise UserError(f"params.yaml: generate_alphas is empty (alpha_sweep {list(config.alpha_sweep)} holds only "
                        f"the {config.intervention} identity); set generate_alphas, e.g. [0, 4]")
    model_record = ModelRecord.read()
    for layer in config.layers:
        model_record.layer(layer)  # a layer missing from data/model.json is one line, before anything runs
    features = artifacts.read_features(config.layers)
    for layer in config.layers:
        if not (features["layer"] == layer).any():
            raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    artifacts.need(artifacts.TOKENS, "tokenize")

    with stage_record("generate", layers=list(config.layers)) as record:
        # a prompt too long for the context is refused before anything loads
        sharded.prompt_ids(config, load_tokenizer(model_record), model_record.model.n_ctx)
        settings = settings_from_env()
        layers = list(config.layers)
        work = ShardWork(
            stage="generate", fn=sharded.layer_block, inputs=sharded.GenerateInputs(config.for_checks(), PARAMS),
            specs=[{"layers": layers[block.start:block.stop]} for block in split_evenly(len(layers), settings.shards)],
            fingerprint="" if settings.executor == "local" else stage_fingerprint(
                "generate", {key: getattr(config, key) for key in PARAMS},
                [artifacts.MODEL_JSON, artifacts.preset_dir(model_record.preset), artifacts.TOKENS, artifacts.FEATURES]))
        run = run_shards(work, settings)
        tables, details, record["device"] = sharded.merge(run.results)
        record["executor"] = run.how
        frame = pd.DataFrame(tables)[list(columns.GENERATION_COLUMNS)]
        n_rows = sum(len(d["rows"]) for d in details)
        record["continuations"] = n_rows
        record["tokens_generated"] = n_rows * config.generate_tokens
        write_json(artifacts.GENERATIONS, {
            "intervention": config.intervention, "alphas": list(config.generate_alphas),
            "generate_tokens": config.generate_tokens, "temperature": config.generate_temperature, "seed": config.seed,
            "decodings": list(sharded.DECODINGS), "layers": details,
        })
        artifacts.write_generation_metrics(frame)
    return frame
