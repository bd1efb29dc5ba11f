"""Stage `features`: choose `features_per_layer` features per layer -> data/features.csv.

Sources (`feature_source`): `csv` (a curated file, pipeline.sources.csv_file), `neuronpedia`
(the public API with an on-disk cache, pipeline.sources.neuronpedia) or `auto` (activation
statistics on the corpus, pipeline.sources.auto). Every row says where it came from and why.
"""

from __future__ import annotations

import pandas as pd

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.io import write_csv
from pipeline.loading import resolve_device
from pipeline.resolved import Resolved
from pipeline.runinfo import device_description, stage_record
from pipeline.sources.selection import FEATURE_COLUMNS, FeatureChoice


def check_layers(config: Config, resolved: Resolved) -> None:
    missing = [layer for layer in config.layers if layer not in resolved.layers]
    if missing:
        raise UserError(f"layers {missing} are not in {paths.MODEL_JSON} (it has {resolved.layers}); "
                        "rerun the model stage (`dvc repro` does this)")
    too_many = [layer for layer in config.layers if config.features_per_layer > resolved.d_sae(layer)]
    if too_many:
        layer = too_many[0]
        raise UserError(f"params.yaml: features_per_layer is {config.features_per_layer} but layer {layer}'s "
                        f"SAE has {resolved.d_sae(layer)} features")


def select_features(config: Config, resolved: Resolved) -> list[FeatureChoice]:
    check_layers(config, resolved)
    if config.feature_source == "csv":
        from pipeline.sources.csv_file import read_curated_csv

        return read_curated_csv(config.features_csv, config.layers, config.features_per_layer,
                                {layer: resolved.d_sae(layer) for layer in config.layers})
    if config.feature_source == "neuronpedia":
        from pipeline.sources.neuronpedia import choose_from_neuronpedia

        return choose_from_neuronpedia(config, resolved)
    from pipeline.sources.auto import choose_auto
    from pipeline.stages.tokenize import load_tokens

    tokens = load_tokens()
    device = resolve_device(config.device)
    model = resolved.load_model(device, config.dtype)
    plans = {layer: resolved.plan(layer) for layer in config.layers}
    saes = {layer: resolved.load_sae(layer, device, config.dtype) for layer in config.layers}
    return choose_auto(model, saes, plans, tokens, resolved.tokenizer(), config.features_per_layer,
                       config.min_density, config.max_density, config.batch_size)


def run_features_stage(config: Config) -> pd.DataFrame:
    resolved = Resolved.load()
    # The Neuronpedia cache is a persistent DVC output of this stage: it exists for every source.
    paths.NEURONPEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    with stage_record("features", source=config.feature_source) as record:
        record["device"] = device_description(resolve_device(config.device))
        choices = select_features(config, resolved)
        frame = pd.DataFrame([c.row() for c in choices], columns=list(FEATURE_COLUMNS))
        write_csv(paths.FEATURES, frame)
    return frame


def read_features(layers: tuple[int, ...] | list[int] | None = None) -> pd.DataFrame:
    if not paths.FEATURES.exists():
        raise UserError(f"{paths.FEATURES} not found; run `dvc repro features` first")
    frame = pd.read_csv(paths.FEATURES, keep_default_na=False, na_values=[""])
    if layers is not None:
        frame = frame[frame["layer"].isin(list(layers))]
    return frame
