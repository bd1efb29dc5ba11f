"""Stage `intervene@L` in shards: blocks of the layer's features.

A shard runs the engine (pipeline.engine.run) on its block of features and computes their rows of
metrics/layers/layer_L.csv and their entries of data/detail/layer_L.json; the merge concatenates the
blocks in feature order. Every number of a feature is computed exactly as in the run over the whole
layer, so the bytes are the same (tests/test_shards_exact.py):

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

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from pipeline import artifacts
from pipeline.config import Config
from pipeline.engine.forward import FeatureEncoder

# Not circular: the stage imports this module inside its function, never at its top.
from pipeline.stages import intervene as stage


class FeatureColumns:
    """Some features of an encoder: its activations computed for all of them, then these columns taken,
    so each value is bit for bit the one the whole layer's run sees."""

    def __init__(self, encoder: FeatureEncoder, positions: list[int]):
        self.full, self.positions = encoder, list(positions)
        self.index = torch.tensor(self.positions, dtype=torch.long, device=encoder.directions.device)
        self.directions: Float[Tensor, "n_feat d_in"] = encoder.directions[self.index]

    def __call__(self, resid: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos n_feat"]:
        return self.full(resid)[..., self.index]


@dataclass(frozen=True)
class LayerInputs:
    """What every shard of intervene@L needs besides the files it reads: the params and the layer."""

    config: Config
    layer: int


def feature_block(inputs: LayerInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: the rows and detail entries of the layer's features at positions spec["features"] (into the
    layer's rows of data/features.csv, in file order)."""
    from tqdm import tqdm

    from pipeline.engine.controls import random_unit_directions
    from pipeline.engine.interventions import INTERVENTIONS
    from pipeline.engine.resampling import Resampler
    from pipeline.engine.run import run_layer
    from pipeline.loading import load_study_model_fast, load_study_sae_fast, resolve_device
    from pipeline.runinfo import device_description
    from pipeline.stage_params import StageParams
    from pipeline.tokenizer import study_tokenizer

    config = StageParams.of(inputs.config, "intervene", stage.PARAMS)
    layer, positions = inputs.layer, list(spec["features"])
    model_record = artifacts.ModelRecord.read()
    plan = model_record.layer(layer).plan()
    layer_features = artifacts.read_features([layer])["feature"].astype(int).tolist()
    features = [layer_features[p] for p in positions]
    tokens = artifacts.read_tokens()
    documents = artifacts.read_tokens_meta()["passage_documents"]
    intervention = INTERVENTIONS[config.intervention]
    values = list(config.alpha_sweep)

    device = resolve_device(config.device)
    model = load_study_model_fast(model_record, device, config.dtype)
    sae = load_study_sae_fast(model_record, layer, device, config.dtype)
    tokenizer = study_tokenizer(model_record)
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
    rows = stage.layer_rows(result, layer, config, tokenizer, rs, intervention, dir_norms, stage.sae_context_size(sae))
    detail = stage.layer_detail(model, encoder, plan, tokens, result, config, tokenizer, intervention)
    return {"rows": rows, "detail": detail, "engine": vars(result.stats), "device": device_description(device)}


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
