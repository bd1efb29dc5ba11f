"""Checks that run before any long work: everything that can be known wrong at second 1.

`preflight` runs at the start of the `model` stage (the first stage of `dvc repro`) and in
`python -m pipeline check`: params (already typed by pipeline.core.params.config), the device, the corpus
name, the layer plan, a curated features file's structure, and whether Neuronpedia selection has
Neuronpedia sources. `after_loading` runs once the model and SAEs are loaded (still in the model
stage, seconds in): the context length, the SAE widths and the curated indices. Later stages
repeat the checks that concern them, so a stage run on its own fails just as early.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.params.config import Config
from pipeline.core.params.device import resolve_device
from pipeline.core.params.limits import check_features_per_layer, check_max_len
from pipeline.core.plan.layers import LayerPlan, plan_layers
from pipeline.load.corpus import CORPORA


def check_corpus_name(config: Config) -> None:
    if config.corpus in CORPORA:
        return
    path = Path(config.corpus)
    if path.suffix != ".txt":
        raise UserError(f"params.yaml: corpus '{config.corpus}' is unknown; allowed: {', '.join(CORPORA)} "
                        "or a path to a .txt file")
    if not path.is_file():
        raise UserError(f"params.yaml: corpus file {path} does not exist")


def check_feature_source(config: Config, plans: list[LayerPlan], d_sae: dict[int, int] | None) -> None:
    wanted = [p for p in plans if p.layer in config.layers]
    if config.feature_source == "csv":
        from pipeline.sources.csv_file import read_curated_csv

        read_curated_csv(config.features_csv, config.layers, config.features_per_layer, d_sae)
    elif config.feature_source == "neuronpedia":
        missing = [p.layer for p in wanted if p.neuronpedia is None]
        if missing:
            raise UserError(
                f"feature_source neuronpedia needs SAEs with a Neuronpedia source, and layers {missing} of "
                f"{config.sae_release} have none; use feature_source auto or csv"
            )


def preflight(config: Config) -> list[LayerPlan]:
    """Everything checkable before downloading or loading anything; returns the layer plan."""
    resolve_device(config.device)
    check_corpus_name(config)
    plans = plan_layers(config)
    check_feature_source(config, plans, d_sae=None)
    return plans


def after_loading(config: Config, n_ctx: int, d_sae: dict[int, int], plans: list[LayerPlan]) -> None:
    check_max_len(config, n_ctx)
    check_features_per_layer(config, d_sae)
    check_feature_source(config, plans, d_sae)
