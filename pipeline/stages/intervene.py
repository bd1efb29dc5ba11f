"""Stage `intervene@L`: every selected feature of layer L x every value of the sweep.

Writes metrics/layers/layer_L.csv (one row per feature x alpha, every metric of
pipeline.engine.metrics) and data/detail/layer_L.json (per feature: top promoted/suppressed
tokens per alpha, the direct logit effect, and snippets: top-activating contexts with clean vs
intervened predictions at `alpha`). A NaN or infinite metric that the definitions do not allow
stops the stage before anything is written.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import artifacts
from pipeline.artifacts import ModelRecord
from pipeline.config import Config
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.interventions import INTERVENTIONS
from pipeline.engine.metrics import density, top_tokens, variant_metrics
from pipeline.engine.run import LayerResult, run_layer
from pipeline.engine.snippets import direct_logit_effect, feature_snippets
from pipeline.errors import NonFiniteMetricError, UserError
from pipeline.io import write_csv, write_json
from pipeline.loading import load_study_model_fast, load_study_sae_fast, resolve_device
from pipeline.runinfo import device_description, stage_record
from pipeline.stage_params import StageParams
from pipeline.tokenizer import study_tokenizer

# The params this stage reads (its dvc.yaml params; tests/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "alpha_sweep", "intervention", "live_percentile", "top_k_tokens", "n_snippets", "batch_size",
          "device", "dtype")

# Live-position metrics are NaN by definition when no position is live; nothing else may be.
NAN_ALLOWED_WHEN_NO_LIVE = ("mean_act_live", "delta_ce_live", "kl_live")
NAN_ALLOWED_ONE_PASSAGE = ("delta_ce_se", "kl_se")


def check_finite(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, float) or math.isfinite(value):
                continue
            if math.isnan(value) and key in NAN_ALLOWED_WHEN_NO_LIVE and row["n_live"] == 0:
                continue
            if math.isnan(value) and key in NAN_ALLOWED_ONE_PASSAGE and row["n_passages"] < 2:
                continue
            raise NonFiniteMetricError(
                f"layer {row['layer']} feature {row['feature']} alpha {row['alpha']:g}: {key} is {value}; "
                "the model or SAE produced non-finite numbers (try dtype float32)"
            )


def _token_list(pairs: list[tuple[int, float]], tokenizer) -> str:
    return json.dumps([[tokenizer.token_str(i), round(v, 6)] for i, v in pairs], ensure_ascii=False)


def layer_rows(result: LayerResult, layer: int, config: Config, tokenizer) -> list[dict[str, Any]]:
    rows = []
    for fi, feature in enumerate(result.features):
        scored = result.acts_scored(fi)
        for ai, value in enumerate(result.values):
            m = variant_metrics(result.ce_clean, result.ce_int[fi, ai], result.kl[fi, ai], scored, result.live[fi])
            mean_delta = result.mean_delta(fi, ai)
            changed = m["n_live"] > 0 and np.any(mean_delta != 0)
            promoted, suppressed = top_tokens(mean_delta, config.top_k_tokens) if changed else ([], [])
            rows.append({
                "layer": layer,
                "feature": feature,
                "alpha": value,
                "intervention": config.intervention,
                "is_headline": value == config.alpha,
                **m,
                "density": density(scored),
                "max_act": float(scored.max()) if scored.size else math.nan,
                "top_promoted": _token_list(promoted, tokenizer),
                "top_suppressed": _token_list(suppressed, tokenizer),
            })
    return rows


def run_intervene_stage(config: Config | StageParams, layer: int) -> pd.DataFrame:
    config = StageParams.of(config, "intervene", PARAMS)
    model_record = ModelRecord.read()
    plan = model_record.layer(layer).plan()
    features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    if not features:
        raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    tokens = artifacts.read_tokens()
    intervention = INTERVENTIONS[config.intervention]
    values = list(config.alpha_sweep)

    with stage_record(f"intervene_{layer}", layer=layer) as record:
        device = resolve_device(config.device)
        record["device"] = device_description(device)
        model = load_study_model_fast(model_record, device, config.dtype)
        sae = load_study_sae_fast(model_record, layer, device, config.dtype)
        tokenizer = study_tokenizer(model_record)
        total = len(features) * len(values) * len(tokens)
        with tqdm(total=total, desc=f"intervene@{layer}", unit="row", disable=None, leave=False) as bar:
            result = run_layer(model, sae, plan.resume_at, torch.from_numpy(tokens), features, values,
                               intervention=intervention, batch_size=config.batch_size,
                               live_percentile=config.live_percentile, progress=bar.update)
        rows = layer_rows(result, layer, config, tokenizer)
        check_finite(rows)
        detail = layer_detail(model, sae, plan, tokens, result, config, tokenizer, intervention)
        write_json(artifacts.layer_detail(layer), detail)
        frame = pd.DataFrame(rows)
        write_csv(artifacts.layer_metrics(layer), frame)
        record["engine"] = vars(result.stats)
    return frame


def layer_detail(model, sae, plan, tokens: np.ndarray, result: LayerResult, config: Config, tokenizer,
                 intervention) -> dict[str, Any]:
    encoder = FeatureEncoder(sae, result.features)
    features = []
    for fi, feature in enumerate(result.features):
        scored = result.acts_scored(fi)
        features.append({
            "feature": feature,
            "neuronpedia_url": plan.neuronpedia_url(feature),
            "density": density(scored),
            "max_act": float(scored.max()),
            "live_threshold": result.live[fi].threshold,
            "direct_logit_effect": direct_logit_effect(model, encoder.directions[fi], tokenizer, config.top_k_tokens),
            "snippets": feature_snippets(model, encoder, plan.resume_at, tokens, fi, scored, config.alpha,
                                         intervention, tokenizer, config.n_snippets),
        })
    return {
        "layer": plan.layer,
        "hook": plan.hook,
        "sae_release": plan.sae_release,
        "sae_id": plan.sae_id,
        "neuronpedia": plan.neuronpedia,
        "alpha": config.alpha,
        "intervention": config.intervention,
        "features": features,
    }
