"""Stage `intervene@L`: every selected feature of layer L x every value of the sweep.

Writes metrics/layers/layer_L.csv (one row per feature x alpha, every metric of
pipeline.engine.metrics and the intervals, tests, controls, dose and context columns of
pipeline.engine.inference) and data/detail/layer_L.json (per feature: top promoted/suppressed
tokens per alpha, the direct logit effect, and snippets: top-activating contexts with clean vs
intervened predictions at `alpha`). A NaN or infinite metric that the definitions do not allow
stops the stage before anything is written.

The work runs in shards of features, in this process or on a cluster as the environment says
(pipeline/shards/intervene.py, pipeline/executor, docs/cluster.md); any number of shards writes the
same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import artifacts
from pipeline.artifacts import ModelRecord
from pipeline.config import Config
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.inference import nan_allowed, row_inference
from pipeline.engine.interventions import Intervention
from pipeline.engine.metrics import density, max_activation, top_tokens, variant_metrics
from pipeline.engine.resampling import Resampler
from pipeline.engine.run import LayerResult
from pipeline.engine.snippets import direct_logit_effect, feature_snippets
from pipeline.errors import NonFiniteMetricError, UserError
from pipeline.io import write_csv, write_json
from pipeline.runinfo import stage_record
from pipeline.stage_params import StageParams

# The params this stage reads (its dvc.yaml params; tests/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "alpha_sweep", "intervention", "live_percentile", "top_k_tokens", "n_snippets", "control_draws",
          "seed", "batch_size", "device", "dtype")

def check_finite(rows: list[dict[str, Any]]) -> None:
    """No metric may be infinite, or NaN except where its definition makes it so (inference.nan_allowed)."""
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


def _token_list(pairs: list[tuple[int, float]], tokenizer) -> str:
    return json.dumps([[tokenizer.token_str(i), round(v, 6)] for i, v in pairs], ensure_ascii=False)


def layer_rows(result: LayerResult, layer: int, config: Config, tokenizer, rs: Resampler,
               intervention: Intervention, dir_norms: list[float], context_size: int | None) -> list[dict[str, Any]]:
    rows = []
    resid_norm = result.resid_norm[:, 1:-1].astype(np.float64)
    for fi, feature in enumerate(result.features):
        scored = result.acts_scored(fi)
        max_act = max_activation(scored)
        for ai, value in enumerate(result.values):
            m = variant_metrics(result.ce_clean, result.ce_int[fi, ai], result.kl[fi, ai], scored, result.live[fi])
            mean_delta = result.mean_delta(fi, ai)
            changed = m["n_live"] > 0 and np.any(mean_delta != 0)
            promoted, suppressed = top_tokens(mean_delta, config.top_k_tokens) if changed else ([], [])
            coef = intervention.coefficient(torch.from_numpy(result.acts[:, :, fi]).double(), value).numpy()[:, 1:-1]
            has_ctrl = result.ctrl_kl.shape[2] > 0
            stats = row_inference(
                rs, ce_clean=result.ce_clean, ce_int=result.ce_int[fi, ai], kl=result.kl[fi, ai],
                live=result.live[fi].mask, acts=scored,
                ctrl_ce_int=result.ctrl_ce_int[fi, ai] if has_ctrl else None,
                ctrl_kl=result.ctrl_kl[fi, ai] if has_ctrl else None,
                coef=coef, dir_norm=dir_norms[fi], resid_norm=resid_norm, max_act=max_act, context_size=context_size)
            rows.append({
                "layer": layer,
                "feature": feature,
                "alpha": value,
                "intervention": config.intervention,
                "is_headline": value == config.alpha,
                **m,
                "delta_ce_se": stats.pop("delta_ce_se"),
                "kl_se": stats.pop("kl_se"),
                **stats,
                "density": density(scored),
                "max_act": max_act,
                "top_promoted": _token_list(promoted, tokenizer),
                "top_suppressed": _token_list(suppressed, tokenizer),
            })
    return rows


def sae_context_size(sae) -> int | None:
    """The context length the SAE was trained on (SAE-Lens's cfg.metadata.context_size), if it records one."""
    size = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "context_size", None)
    return int(size) if size else None


def run_intervene_stage(config: Config | StageParams, layer: int) -> pd.DataFrame:
    config = StageParams.of(config, "intervene", PARAMS)
    model_record = ModelRecord.read()
    model_record.layer(layer)  # a layer missing from data/model.json is one line, before anything runs
    features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    if not features:
        raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta().get("passage_documents")
    if documents is None or len(documents) != len(tokens):
        raise UserError(f"{artifacts.TOKENS_META} records no document per passage; rerun the tokenize stage")
    # ---- the work, in shards of features (pipeline/shards/intervene.py) where the executor says --------------
    from pipeline.executor import ShardWork, run_shards, settings_from_env, split_evenly, stage_fingerprint
    from pipeline.shards import intervene as sharded

    settings = settings_from_env()
    blocks = split_evenly(len(features), settings.shards)
    work = ShardWork(
        stage=f"intervene@{layer}", fn=sharded.feature_block, inputs=sharded.LayerInputs(config.for_checks(), layer),
        specs=[{"layer": layer, "features": list(block)} for block in blocks],
        fingerprint="" if settings.executor == "local" else stage_fingerprint(
            f"intervene@{layer}", {key: getattr(config, key) for key in PARAMS},
            [artifacts.MODEL_JSON, artifacts.preset_dir(model_record.preset), artifacts.TOKENS,
             artifacts.TOKENS_META, artifacts.FEATURES]))
    with stage_record(f"intervene_{layer}", layer=layer) as record:
        run = run_shards(work, settings)
        rows, detail, how = sharded.merge(run.results)
        check_finite(rows)
        write_json(artifacts.layer_detail(layer), detail)
        frame = pd.DataFrame(rows)
        write_csv(artifacts.layer_metrics(layer), frame)
        record.update(how, executor=run.how)
    # ---- end of the sharded work -------------------------------------------------------------------------------
    return frame


def layer_detail(model, encoder: FeatureEncoder, plan, tokens: np.ndarray, result: LayerResult, config: Config,
                 tokenizer, intervention) -> dict[str, Any]:
    features = []
    for fi, feature in enumerate(result.features):
        scored = result.acts_scored(fi)
        features.append({
            "feature": feature,
            "neuronpedia_url": plan.neuronpedia_url(feature),
            "density": density(scored),
            "max_act": max_activation(scored),
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
