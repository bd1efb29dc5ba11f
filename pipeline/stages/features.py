"""Stage `features`: choose `features_per_layer` features per layer -> data/features.csv.

Sources (`feature_source`): `csv` (a curated file, pipeline.sources.csv_file), `neuronpedia`
(the public API with an on-disk cache, pipeline.sources.neuronpedia), `auto` (activation
statistics on the corpus, pipeline.sources.auto) or `screen` (the largest estimated effects of the
`screen` stage, pipeline.sources.screen). Every row says where it came from and why.
"""

from __future__ import annotations

import pandas as pd

from pipeline.core import artifacts, columns
from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.params.device import resolve_device
from pipeline.core.params.limits import check_features_per_layer
from pipeline.core.params.stage_params import StageParams
from pipeline.core.plan.record import ModelRecord
from pipeline.core.runinfo import device_description, stage_record
from pipeline.load import load_model, load_sae, load_tokenizer
from pipeline.sources.selection import FeatureChoice

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("preset", "feature_source", "features_csv", "features_per_layer", "layers", "seed", "min_density",
          "max_density", "neuronpedia_max_fetch", "batch_size", "device", "dtype")


def check_layers(config: Config, model_record: ModelRecord) -> None:
    missing = [layer for layer in config.layers if layer not in model_record.layer_numbers]
    if missing:
        raise UserError(f"layers {missing} are not in {artifacts.MODEL_JSON} (it has {model_record.layer_numbers}); "
                        "rerun the model stage (`dvc repro` does this)")
    check_features_per_layer(config, {layer: model_record.layer(layer).d_sae for layer in config.layers})


def select_features(config: Config, model_record: ModelRecord) -> list[FeatureChoice]:
    check_layers(config, model_record)
    if config.feature_source == "csv":
        from pipeline.sources.csv_file import read_curated_csv

        return read_curated_csv(config.features_csv, config.layers, config.features_per_layer,
                                {layer: model_record.layer(layer).d_sae for layer in config.layers})
    if config.feature_source == "neuronpedia":
        from pipeline.sources.neuronpedia import choose_from_neuronpedia

        return choose_from_neuronpedia(config, model_record)
    from pipeline.sources.auto import choose_auto

    if config.feature_source == "screen":
        for layer in config.layers:
            artifacts.read_screen_ranks(layer)  # a missing table is one line, before the model loads
    tokens = artifacts.read_tokens()
    device = resolve_device(config.device)
    model = load_model(model_record, device, config.dtype, hooks=True)
    plans = {layer: model_record.layer(layer).plan() for layer in config.layers}
    saes = {layer: load_sae(model_record, layer, device, config.dtype) for layer in config.layers}
    if config.feature_source == "screen":
        from pipeline.sources.screen import choose_from_screen

        return choose_from_screen(model, saes, plans, tokens, load_tokenizer(model_record), config.features_per_layer,
                                  config.min_density, config.max_density, config.batch_size)
    return choose_auto(model, saes, plans, tokens, load_tokenizer(model_record), config.features_per_layer,
                       config.min_density, config.max_density, config.batch_size)


NEURONPEDIA_CACHE_README = """\
Neuronpedia API responses cached by the `features` stage (pipeline/sources/neuronpedia_client.py),
one JSON file per feature; a rerun, or a machine without network that has this folder, makes no
request. Empty of JSON files when the study's features come from `csv` or `auto`.
"""


def run_features_stage(config: Config | StageParams) -> pd.DataFrame:
    config = StageParams.of(config, "features", PARAMS)
    model_record = ModelRecord.read()
    # The Neuronpedia cache is a persistent DVC output of this stage: it exists for every source,
    # never empty (DVC warns about an empty output directory), so it says what it is.
    artifacts.NEURONPEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    about = artifacts.NEURONPEDIA_CACHE / "README.md"
    if not about.exists():
        about.write_text(NEURONPEDIA_CACHE_README)
    with stage_record("features", source=config.feature_source) as record:
        record["device"] = device_description(resolve_device(config.device))
        choices = select_features(config, model_record)
        frame = pd.DataFrame([c.row() for c in choices], columns=list(columns.FEATURE_COLUMNS))
        artifacts.write_features(frame)
    return frame
