"""Stage `intervene@L`: every selected feature of layer L x every value of the sweep.

Writes metrics/layers/layer_L.csv (one row per feature x alpha, every metric of
pipeline.engine.metrics and the intervals, tests, controls, dose and context columns of
pipeline.stats.rows) and data/detail/layer_L.json (per feature: top promoted/suppressed
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

from pipeline.core import artifacts
from pipeline.core.errors import NonFiniteMetricError, UserError
from pipeline.core.io import write_csv, write_json
from pipeline.core.params.config import Config
from pipeline.core.params.device import resolve_device
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import device_description, stage_record
from pipeline.engine.controls import random_unit_directions
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.interventions import INTERVENTIONS, Intervention
from pipeline.engine.metrics import density, max_activation, top_tokens, variant_metrics
from pipeline.engine.run import LayerResult, run_layer
from pipeline.engine.snippets import direct_logit_effect, feature_snippets
from pipeline.load import load_model, load_sae, load_tokenizer
from pipeline.stats.nan_rules import nan_allowed
from pipeline.stats.resampling import Resampler
from pipeline.stats.rows import row_statistics

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "alpha_sweep", "intervention", "live_percentile", "top_k_tokens", "n_snippets", "control_draws",
          "seed", "batch_size", "device", "dtype")

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


def _token_list(pairs: list[tuple[int, float]], tokenizer) -> str:
    return json.dumps([[tokenizer.token_str(i), round(v, 6)] for i, v in pairs], ensure_ascii=False)


def layer_rows(result: LayerResult, layer: int, config: Config, tokenizer, rs: Resampler,
               intervention: Intervention, dir_norms: list[float], context_size: int | None) -> list[dict[str, Any]]:
    rows = []
    resid_norm = result.resid_norm[:, 1:-1].astype(np.float64)
    scale = result.scale[:, 1:-1].astype(np.float64)  # s_t: delta_t = c_t s_t d_i
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
            stats = row_statistics(
                rs, ce_clean=result.ce_clean, ce_int=result.ce_int[fi, ai], kl=result.kl[fi, ai],
                live=result.live[fi].mask, acts=scored,
                ctrl_ce_int=result.ctrl_ce_int[fi, ai] if has_ctrl else None,
                ctrl_kl=result.ctrl_kl[fi, ai] if has_ctrl else None,
                coef=coef, dir_norm=dir_norms[fi], resid_norm=resid_norm, max_act=max_act, context_size=context_size,
                scale=scale)
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
    plan = model_record.layer(layer).plan()
    features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    if not features:
        raise UserError(f"{artifacts.FEATURES} has no features for layer {layer}; rerun the features stage")
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta().get("passage_documents")
    if documents is None or len(documents) != len(tokens):
        raise UserError(f"{artifacts.TOKENS_META} records no document per passage; rerun the tokenize stage")
    intervention = INTERVENTIONS[config.intervention]
    values = list(config.alpha_sweep)

    with stage_record(f"intervene_{layer}", layer=layer) as record:
        device = resolve_device(config.device)
        record["device"] = device_description(device)
        model = load_model(model_record, device, config.dtype)
        sae = load_sae(model_record, layer, device, config.dtype)
        tokenizer = load_tokenizer(model_record)
        encoder = FeatureEncoder(sae, features)
        controls = random_unit_directions(config.seed, layer, features, config.control_draws,
                                          encoder.directions.shape[-1])
        total = len(features) * len(values) * (1 + config.control_draws) * len(tokens)
        with tqdm(total=total, desc=f"intervene@{layer}", unit="row", disable=None, leave=False) as bar:
            result = run_layer(model, sae, plan.resume_at, torch.from_numpy(tokens), features, values,
                               intervention=intervention, batch_size=config.batch_size,
                               live_percentile=config.live_percentile, progress=bar.update, controls=controls)
        dir_norms = encoder.directions.double().norm(dim=-1).tolist()
        rs = Resampler.for_passages(documents, config.seed, layer)
        rows = layer_rows(result, layer, config, tokenizer, rs, intervention, dir_norms, sae_context_size(sae))
        check_finite(rows)
        detail = layer_detail(model, encoder, plan, tokens, result, config, tokenizer, intervention)
        write_json(artifacts.layer_detail(layer), detail)
        frame = pd.DataFrame(rows)
        write_csv(artifacts.layer_metrics(layer), frame)
        record["engine"] = vars(result.stats)
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
