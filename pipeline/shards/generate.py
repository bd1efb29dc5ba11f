"""Stage `generate` in shards: blocks of layers.

A layer's generation uses nothing of another layer: its own SAE, its own features' prompts and rows,
sampling noise seeded by (seed, step, prompt). So a shard runs the stage's per-layer work
(pipeline.stages.generate.run_layer_generation) for its block of layers exactly as the whole run
does, and the merge concatenates the blocks in layer order: the same bytes for any number of shards
(tests/test_shards_exact.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import artifacts
from pipeline.config import Config

# Not circular: the stage imports this module inside its function, never at its top.
from pipeline.stages import generate as stage


@dataclass(frozen=True)
class GenerateInputs:
    """What every shard of `generate` needs besides the files it reads: the params."""

    config: Config


def layer_block(inputs: GenerateInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: the table rows and generations.json entries of the layers spec["layers"], in that order."""
    from tqdm import tqdm

    from pipeline.loading import load_study_model, load_study_sae, resolve_device
    from pipeline.runinfo import device_description
    from pipeline.stage_params import StageParams
    from pipeline.tokenizer import study_tokenizer

    config = StageParams.of(inputs.config, "generate", stage.PARAMS)
    model_record = artifacts.ModelRecord.read()
    features = artifacts.read_features(spec["layers"])
    tokens = artifacts.read_tokens()
    tokenizer = study_tokenizer(model_record)
    neutral = stage.prompt_ids(config, tokenizer, model_record.model.n_ctx)
    device = resolve_device(config.device)
    model = load_study_model(model_record, device, config.dtype)
    tables, details = [], []
    with tqdm(desc="generate", unit="row", disable=None, leave=False) as bar:
        for layer in spec["layers"]:
            plan = model_record.layer(layer).plan()
            layer_features = features[features["layer"] == layer]["feature"].astype(int).tolist()
            sae = load_study_sae(model_record, layer, device, config.dtype)
            table, detail = stage.run_layer_generation(model, sae, plan, layer_features, tokens, neutral, config,
                                                       tokenizer, bar)
            tables += table
            details.append(detail)
    return {"tables": tables, "details": details, "device": device_description(device)}


def merge(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """The shards' table rows and per-layer details in layer order (the specs' order), and the device(s)."""
    devices = sorted({r["device"] for r in results})
    return ([row for r in results for row in r["tables"]], [d for r in results for d in r["details"]],
            devices[0] if len(devices) == 1 else devices)
