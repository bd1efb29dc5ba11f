"""The work of stage `screen` (pipeline.stages.screen), as shards of layers.

A shard screens its block of layers in one forward and one backward pass per passage batch
(pipeline.engine.attribution.screen: every feature's first-order slope of delta_ce in alpha at alpha = 1), then,
per layer, runs the picked features exactly at every value of the sweep (pipeline.engine.screen_check: the
`screen_top_k` largest |slope| and a sample of `screen_random` other firing features, seeded by (seed, layer)).

A layer's numbers use nothing of another layer: the gradient at a layer's hook is the backward of the same
blocks whichever other hooks share the pass, the picks and their exact runs are the layer's own. So a shard
returns for its layers what one run over every layer returns, and `merge` concatenates the blocks in layer
order and computes the agreement figures from the merged rows: the same bytes for any number of shards
(tests/stages/test_screen_stage.py). With one shard, the pass serves every layer at once (the cheapest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core import artifacts
from pipeline.core.columns import SCREEN_VERIFICATION_COLUMNS
from pipeline.core.params.config import Config
from pipeline.engine.attribution import LayerScreen, ScreenLayer, screen
from pipeline.engine.screen_check import pick_features, verify_layer


@dataclass(frozen=True)
class ScreenInputs:
    """What every shard of `screen` needs besides the files it reads: the params (and the keys the stage declares,
    so a shard reads no other)."""

    config: Config
    params: tuple[str, ...]


def layer_block(inputs: ScreenInputs, spec: dict[str, Any]) -> dict[str, Any]:
    """One shard: the screen of the layers spec["layers"] and their verification rows, in that order."""
    from tqdm import tqdm

    from pipeline.core.params.device import resolve_device
    from pipeline.core.params.stage_params import StageParams
    from pipeline.core.plan.record import ModelRecord
    from pipeline.core.runinfo import device_description
    from pipeline.load import load_model, load_sae

    config = StageParams.of(inputs.config, "screen", inputs.params)
    model_record = ModelRecord.read()
    tokens = torch.from_numpy(artifacts.read_tokens())
    device = resolve_device(config.device)
    model = load_model(model_record, device, config.dtype)
    specs = []
    for layer in spec["layers"]:
        plan = model_record.layer(layer).plan()
        specs.append(ScreenLayer(layer, load_sae(model_record, layer, device, config.dtype), plan.resume_at))
    started = time.perf_counter()
    with tqdm(total=len(tokens), desc="screen", unit="passage", disable=None, leave=False) as bar:
        result = screen(model, specs, tokens, batch_size=config.batch_size, progress=bar.update)
    seconds = {"screen": time.perf_counter() - started}
    started = time.perf_counter()
    rows, picked = [], {}
    for layer_spec in specs:
        layer_screen = result.layers[layer_spec.layer]
        picks = pick_features(layer_screen, config.screen_top_k, config.screen_random, config.seed)
        picked[layer_spec.layer] = {f: picks.group(f) for f in picks.features}
        rows.append(verify_layer(model, layer_spec.sae, layer_spec.resume_at, tokens, layer_screen, picks,
                                 list(config.alpha_sweep), batch_size=config.batch_size,
                                 second_order=config.screen_estimator == "second_order"))
    seconds["verify"] = time.perf_counter() - started
    return {"screens": {layer: _arrays(s) for layer, s in result.layers.items()}, "picked": picked,
            "rows": [row for frame in rows for row in frame.to_dict("records")], "seconds": seconds,
            "stats": vars(result.stats), "device": device_description(device)}


def _arrays(s: LayerScreen) -> dict[str, Any]:
    return {"n_scored": s.n_scored, "slope_sum": s.slope_sum, "n_firing": s.n_firing, "act_sum": s.act_sum,
            "max_act": s.max_act, "ce_clean": s.ce_clean}


@dataclass
class MergedScreen:
    screens: dict[int, LayerScreen]  # in layer order
    picked: dict[int, dict[int, str]]  # layer -> verified feature -> group
    verification: pd.DataFrame  # SCREEN_VERIFICATION_COLUMNS
    how: dict[str, Any]  # timings, pass statistics and device(s), for the run record


def merge(results: list[dict[str, Any]]) -> MergedScreen:
    """The shards' layers in the specs' order; timings summed over shards (they ran one after another or apart)."""
    screens = {layer: LayerScreen(layer=layer, **arrays) for r in results for layer, arrays in r["screens"].items()}
    picked = {layer: groups for r in results for layer, groups in r["picked"].items()}
    verification = pd.DataFrame([row for r in results for row in r["rows"]], columns=list(SCREEN_VERIFICATION_COLUMNS))
    devices = sorted({r["device"] for r in results})
    how = {"seconds": {key: float(np.sum([r["seconds"][key] for r in results])) for key in ("screen", "verify")},
           "firing_pairs": int(sum(r["stats"]["firing_pairs"] for r in results)),
           "oom_halvings": int(sum(r["stats"]["oom_halvings"] for r in results)),
           "device": devices[0] if len(devices) == 1 else devices}
    return MergedScreen(screens, picked, verification, how)
