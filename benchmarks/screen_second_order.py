"""Does a second-order term buy the screen's estimate the agreement the first-order one lacks? Measured on a built
study (after `dvc repro` or `dvc exp run`, run from its folder):

    python benchmarks/screen_second_order.py --layers 0 6 11

For each layer it screens the corpus (pipeline.engine.attribution.screen), picks the features the `screen` stage
verifies (params `screen_top_k`, `screen_random`, `seed`), runs them exactly at every alpha of the sweep, and
prints the agreement of the first-order estimate (alpha - 1) * slope and of the second-order one, which adds
(alpha - 1)^2 / 2 * curvature (pipeline.engine.attribution.second_order_sums: v^T H v along the feature's push), per
alpha. Prints figures only; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from pipeline.core import artifacts
from pipeline.core.params.config import load_config
from pipeline.core.params.device import resolve_device
from pipeline.core.plan.record import ModelRecord
from pipeline.engine.attribution import ScreenLayer, screen
from pipeline.engine.screen_check import pick_features, verify_layer
from pipeline.load import load_model, load_sae
from pipeline.stats.screen_agreement import agreement

FIGURES = ["spearman", "pearson", "sign_agreement", "top_overlap", "median_abs_rel_error"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.params)
    record = ModelRecord.read()
    tokens = torch.from_numpy(artifacts.read_tokens())
    device = resolve_device(config.device)
    model = load_model(record, device, config.dtype)
    frames, seconds, n_scored = [], 0.0, 0
    for layer in args.layers:
        spec = ScreenLayer(layer, load_sae(record, layer, device, config.dtype), record.layer(layer).plan().resume_at)
        layer_screen = screen(model, [spec], tokens, batch_size=config.batch_size).layers[layer]
        picks = pick_features(layer_screen, config.screen_top_k, config.screen_random, config.seed)
        started = time.perf_counter()
        frames.append(verify_layer(model, spec.sae, spec.resume_at, tokens, layer_screen, picks,
                                   list(config.alpha_sweep), batch_size=config.batch_size, second_order=True))
        seconds += time.perf_counter() - started
        n_scored = layer_screen.n_scored
    rows = pd.concat(frames, ignore_index=True)
    table = agreement(rows, n_scored=n_scored, top_n=config.screen_top_k)
    table = table[table["subset"] == "all"]
    pd.set_option("display.width", 160)
    print(table.groupby(["estimator", "alpha"])[FIGURES].median().round(3).to_string())
    print(f"exact runs and second-order terms: {seconds:.1f} s for {len(args.layers)} layers x "
          f"{len(picks.features)} features (the screen stage's run record, data/runs/screen.json, times the exact "
          f"runs alone)")


if __name__ == "__main__":
    main()
