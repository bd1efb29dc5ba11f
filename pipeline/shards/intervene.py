"""The work of stage `intervene` (pipeline.stages.intervene), as shards: blocks of layers, or of one layer's features.

A shard runs the engine (pipeline.engine.run) on its layers' features and computes their rows of
metrics/layers/layer_L.csv (every metric of pipeline.engine.metrics and the intervals, tests, controls, dose and
context columns of pipeline.stats.rows) and their entries of data/detail/layer_L.json (top promoted/suppressed
tokens, the direct logit effect, snippets: top-activating contexts with clean vs intervened predictions). It loads
the model once and each layer's SAE in turn. `merge` puts each layer's blocks together in feature order. Every
number of a feature is computed exactly as in the run over the whole layer, so the bytes are the same for any
number of shards (tests/stages/test_shards_exact.py):

- the activations come from the encoder of *all* the layer's features (`FeatureColumns`), since a
  matrix product with another number of columns can round differently;
- the engine's batches never mix two features' rows (pipeline.engine.run._per_feature_batches);
- live thresholds, statistics and controls are per feature already: the live threshold is a percentile
  of the feature's own activations over all passages, the resamples are seeded by (seed, layer) and
  shared by every row, each control direction by (seed, layer, feature, draw).

Why not blocks of passages: a feature's live threshold and its document-level statistics need every
passage, so a passage block could only return per-position arrays (for GPT-2 Small's default study
about 0.9 GB per layer) for the merge to finish, and the merge would need the model again for the
snippets. Blocks of features return a few kilobytes each.
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
from pipeline.executor import split_evenly
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
class InterveneInputs:
    """What every shard of `intervene` needs besides the files it reads: the params (and the keys the stage
    declares, so a shard reads no other)."""

    config: Config
    params: tuple[str, ...]


def shard_specs(features_per_layer: dict[int, int], n_shards: int) -> list[dict[str, Any]]:
    """The stage's work in min(n_shards, its features) shards, in layer and feature order.

    Up to one shard per layer: blocks of whole layers ({"layers": [0, 1, 2]}). More: each layer's features cut
    into blocks ({"layers": [0], "features": [0, 1]}, positions into the layer's rows of data/features.csv), each
    further shard going to the layer with the most features per shard (the first such layer on a tie)."""
    layers = list(features_per_layer)
    if n_shards <= len(layers):
        return [{"layers": layers[block.start:block.stop]} for block in split_evenly(len(layers), n_shards)]
    shards = dict.fromkeys(layers, 1)
    for _ in range(min(n_shards, sum(features_per_layer.values())) - len(layers)):
        layer = max((la for la in layers if shards[la] < features_per_layer[la]),
                    key=lambda la: features_per_layer[la] / shards[la])
        shards[layer] += 1
    return [{"layers": [layer], "features": list(block)}
            for layer in layers for block in split_evenly(features_per_layer[layer], shards[layer])]


def shard(inputs: InterveneInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: for each layer of spec["layers"], the rows and detail entries of its features (those at positions
    spec["features"] if given, else all), the model loaded once."""
    from pipeline.core.params.device import resolve_device
    from pipeline.core.params.stage_params import StageParams
    from pipeline.core.plan.record import ModelRecord
    from pipeline.core.runinfo import device_description
    from pipeline.load import load_model, load_tokenizer

    config = StageParams.of(inputs.config, "intervene", inputs.params)
    model_record = ModelRecord.read()
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta()["passage_documents"]
    device = resolve_device(config.device)
    model = load_model(model_record, device, config.dtype)
    tokenizer = load_tokenizer(model_record)
    layers = [layer_work(model, tokenizer, model_record, config, device, layer, spec.get("features"), tokens,
                         documents) for layer in spec["layers"]]
    return {"layers": layers, "device": device_description(device)}


def layer_work(model, tokenizer, model_record, config: Config, device: torch.device, layer: int,
               positions: list[int] | None, tokens: np.ndarray, documents: list) -> dict[str, Any]:
    """One layer's part of a shard: its features at `positions` (None: all) x every value of the sweep."""
    from tqdm import tqdm

    from pipeline.engine.controls import random_unit_directions
    from pipeline.engine.interventions import INTERVENTIONS
    from pipeline.engine.run import run_layer
    from pipeline.load import load_sae

    plan = model_record.layer(layer).plan()
    layer_features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    positions = list(range(len(layer_features))) if positions is None else list(positions)
    features = [layer_features[p] for p in positions]
    intervention = INTERVENTIONS[config.intervention]
    values = list(config.alpha_sweep)
    sae = load_sae(model_record, layer, device, config.dtype)
    whole_layer = FeatureEncoder(sae, layer_features)
    encoder = FeatureColumns(whole_layer, positions)
    controls = random_unit_directions(config.seed, layer, features, config.control_draws,
                                      encoder.directions.shape[-1])
    total = len(features) * len(values) * (1 + config.control_draws) * len(tokens)
    with tqdm(total=total, desc=f"intervene layer {layer}", unit="row", disable=None, leave=False) as bar:
        result = run_layer(model, sae, plan.resume_at, torch.from_numpy(tokens), features, values,
                           intervention=intervention, batch_size=config.batch_size,
                           live_percentile=config.live_percentile, progress=bar.update, controls=controls,
                           encoder=encoder)
    dir_norms = whole_layer.directions.double().norm(dim=-1)[encoder.index].tolist()
    rs = Resampler.for_passages(documents, config.seed, layer)
    rows = layer_rows(result, layer, config, tokenizer, rs, intervention, dir_norms, sae_context_size(sae))
    detail = layer_detail(model, encoder, plan, tokens, result, config, tokenizer, intervention)
    return {"layer": layer, "rows": rows, "detail": detail, "engine": vars(result.stats)}


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


@dataclass
class LayerOutput:
    """One layer's rows (its metrics/layers/layer_L.csv), detail (data/detail/layer_L.json) and engine counts."""

    rows: list[dict[str, Any]]
    detail: dict[str, Any]
    engine: dict[str, Any]


def merge(results: list[dict[str, Any]]) -> tuple[dict[int, LayerOutput], str | list[str]]:
    """Each layer's blocks put together in feature order (the specs' order), its engine counts summed, and the
    devices the shards ran on: per layer one table and one detail file, as one run over every layer writes them."""
    parts: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        for part in result["layers"]:
            parts.setdefault(part["layer"], []).append(part)
    out = {}
    for layer, blocks in parts.items():
        detail = dict(blocks[0]["detail"])
        detail["features"] = [entry for b in blocks for entry in b["detail"]["features"]]
        engine = {key: sum(b["engine"][key] for b in blocks) for key in blocks[0]["engine"]}
        engine["batch_size"] = min(b["engine"]["batch_size"] for b in blocks)  # after any out-of-memory halving
        out[layer] = LayerOutput([row for b in blocks for row in b["rows"]], detail, engine)
    devices = sorted({r["device"] for r in results})
    return out, devices[0] if len(devices) == 1 else devices
