"""Checks of params against what the model stage loaded, each written once: the model stage runs
them right after loading (pipeline.preflight.after_loading) and the stage that relies on one runs it
again, so a stage run on its own fails just as early. Pure functions of numbers: no library imports.
"""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.core.params.config import Config


def check_max_len(config: Config, n_ctx: int) -> None:
    if config.max_len > n_ctx:
        raise UserError(f"params.yaml: max_len is {config.max_len} but the model's context is {n_ctx} tokens; "
                        f"allowed: 3..{n_ctx}")


def check_features_per_layer(config: Config, d_sae: dict[int, int]) -> None:
    """Each studied layer's SAE must have at least features_per_layer features."""
    for layer in config.layers:
        if layer in d_sae and config.features_per_layer > d_sae[layer]:
            raise UserError(f"params.yaml: features_per_layer is {config.features_per_layer} but layer {layer}'s "
                            f"SAE has {d_sae[layer]} features")


def check_layers_in_range(layers: tuple[int, ...] | list[int], n_layers: int) -> None:
    """Every studied layer must exist in a model of `n_layers` blocks."""
    bad = sorted({layer for layer in layers if layer >= n_layers})
    if bad:
        raise UserError(f"params.yaml: layers {bad} are out of range; the model has {n_layers} layers "
                        f"(allowed 0..{n_layers - 1})")
