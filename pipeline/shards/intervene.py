"""The work of stage `intervene@L` (pipeline.stages.intervene), as shards: blocks of the layer's features.

A shard runs the engine (pipeline.engine.run) on its block of features and computes their rows of
metrics/layers/layer_L.csv (every metric of pipeline.engine.metrics and the intervals, tests, controls, dose and
context columns of pipeline.stats.rows) and their entries of data/detail/layer_L.json (top promoted/suppressed
tokens, the direct logit effect, snippets: top-activating contexts with clean vs intervened predictions); the merge concatenates the
blocks in feature order. Every number of a feature is computed exactly as in the run over the whole
layer, so the bytes are the same (tests/stages/test_shards_exact.py):

- the activations come from the encoder of *all* the layer's features (`FeatureColumns`), since a
  matrix product with another number of columns can round differently;
- the engine's batches never mix two features' rows (pipeline.engine.run._per_feature_batches);
- live thresholds, statistics and controls are per feature already: the live threshold is a percentile
  of the feature's own activations over all passages, the resamples are seeded by (seed, layer) and
  shared by every row, each control direction by (seed, layer, feature, draw).

Why not blocks of passages: a feature's live threshold and its document-level statistics need every
passage, so a passage block could only return per-position arrays (for GPT-2 Small's default study
about 0.9 GB per layer) for the merge to finish, and the merge would need the model again for the
snippets. Blocks of features return a few kilobytes each, and the work ahead (every feature of a layer
screened) has features to spare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from pipeline.core import artifacts
from pipeline.core.params.config import Config
from pipeline.engine.forward import FeatureEncoder
from pipeline.engine.interventions import Intervention
from pipeline.engine.metrics import density, max_activation, top_tokens, variant_metrics
from pipeline.engine.run import LayerResult
from pipeline.engine.snippets import direct_logit_effect, feature_snippets
from pipeline.stats.resampling import Resampler
from pipeline.stats.rows import row_statistics


class FeatureColumns:
    """Some features of an encoder: its activations computed for all of them, then these columns taken,
    so each value is bit for bit the one the whole layer's run sees."""

    def __init__(self, encoder: FeatureEncoder, positions: list[int]):
        self.full, self.positions = encoder, list(positions)
        self.index = torch.tensor(self.positions, dtype=torch.long, device=encoder.directions.device)
        self.directions: Float[Tensor, "n_feat d_in"] = encoder.directions[self.index]
        self.normalizes = encoder.normalizes

    def scale(self, resid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos"] | None:
        """s_t, the same for every feature of the SAE (pipeline.engine.normalization)."""
        return self.full.scale(resid)

    def __call__(self, resid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos n_feat"]:
        return self.full(resid)[..., self.index]


@dataclass(frozen=True)
class LayerInputs:
    """What every shard of intervene@L needs besides the files it reads: the params (and the keys the stage
    declares, so a shard reads no other) and the layer."""

    config: Config
    params: tuple[str, ...]
    layer: int


def feature_block(inputs: LayerInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: the rows and detail entries of the layer's features at positions spec["features"] (into the
    layer's rows of data/features.csv, in file order)."""
    from tqdm import tqdm

    from pipeline.core.params.device import resolve_device
    from pipeline.core.params.stage_params import StageParams
    from pipeline.core.plan.record import ModelRecord
    from pipeline.core.runinfo import device_description
    from pipeline.engine.controls import random_unit_directions
    from pipeline.engine.interventions import INTERVENTIONS
    from pipeline.engine.run import run_layer
    from pipeline.load import load_model, load_sae, load_tokenizer

    config = StageParams.of(inputs.config, "intervene", inputs.params)
    layer, positions = inputs.layer, list(spec["features"])
    model_record = ModelRecord.read()
    plan = model_record.layer(layer).plan()
    layer_features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    features = [layer_features[p] for p in positions]
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta()["passage_documents"]
    intervention = INTERVENTIONS[config.intervention]
    values = list(config.alpha_sweep)

    device = resolve_device(config.device)
    model = load_model(model_record, device, config.dtype)
    sae = load_sae(model_record, layer, device, config.dtype)
    tokenizer = load_tokenizer(model_record)
    whole_layer = FeatureEncoder(sae, layer_features)
    encoder = FeatureColumns(whole_layer, positions)
    controls = random_unit_directions(config.seed, layer, features, config.control_draws,
                                      encoder.directions.shape[-1])
    total = len(features) * len(values) * (1 + config.control_draws) * len(tokens)
    with tqdm(total=total, desc=f"intervene@{layer}", unit="row", disable=None, leave=False) as bar:
        result = run_layer(model, sae, plan.resume_at, torch.from_numpy(tokens), features, values,
                           intervention=intervention, batch_size=config.batch_size,
                           live_percentile=config.live_percentile, progress=bar.update, controls=controls,
                           encoder=encoder)
    dir_norms = whole_layer.directions.double().norm(dim=-1)[encoder.index].tolist()
    rs = Resampler.for_passages(documents, config.seed, layer)
    rows = layer_rows(result, layer, config, tokenizer, rs, intervention, dir_norms, sae_context_size(sae))
    detail = layer_detail(model, encoder, plan, tokens, result, config, tokenizer, intervention)
    return {"rows": rows, "detail": detail, "engine": vars(result.stats), "device": device_description(device)}


def _token_list(pairs: list[tuple[int, float]], tokenizer) -> str:
    return json.dumps([[tokenizer.token_str(i), round(v, 6)] for i, v in pairs], ensure_ascii=False)


def layer_rows(result: LayerResult, layer: int, config: Config, tokenizer, rs: Resampler,
               intervention: Intervention, dir_norms: list[float], context_size: int | None) -> list[dict[str, Any]]:
    rows = []
    resid_norm = result.resid_norm[:, 1:-1].astype(np.float64)
    scale = result.scale[:, 1:-1].astype(np.float64)  # s_t: delta_t = c_t s_t d_i (docs/method.md)
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


def merge(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The shards' rows and detail in feature order (the specs' order), their engine counts summed, and
    the devices they ran on; one table and one detail file, as the whole layer's run writes them."""
    rows = [row for r in results for row in r["rows"]]
    detail = dict(results[0]["detail"])
    detail["features"] = [entry for r in results for entry in r["detail"]["features"]]
    engine = {key: sum(r["engine"][key] for r in results) for key in results[0]["engine"]}
    engine["batch_size"] = min(r["engine"]["batch_size"] for r in results)  # after any out-of-memory halving
    devices = sorted({r["device"] for r in results})
    return rows, detail, {"engine": engine, "device": devices[0] if len(devices) == 1 else devices}
