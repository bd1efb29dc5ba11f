"""Stage `aggregate`: per-layer tables -> the study's tables and DVC metrics.

- metrics/per_feature_metrics.csv: one row per (layer, feature, alpha), with the feature's label,
  source and Neuronpedia link joined in;
- metrics/per_layer_summary.csv: per (layer, alpha), mean / std / min / max over the features;
- metrics/summary.json: small, headline numbers at `alpha` plus sanity counts, for
  `dvc metrics diff`.
Only the layers in params `layers` are read, so files left from a run with other layers never
leak in; a per-layer file whose alphas differ from the current sweep is refused as stale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline import artifacts
from pipeline.config import Config
from pipeline.engine.identity import INTERVENTION_IDENTITY
from pipeline.errors import UserError
from pipeline.io import write_csv, write_json
from pipeline.runinfo import stage_record
from pipeline.stage_params import StageParams

# The params this stage reads (its dvc.yaml params; tests/test_stage_deps.py checks they agree).
PARAMS = ("layers", "alpha", "alpha_sweep", "intervention")


def load_layer_tables(config: Config) -> pd.DataFrame:
    frames = []
    for layer in config.layers:
        path = artifacts.layer_metrics(layer)
        if not path.exists():
            raise UserError(f"{path} not found; run `dvc repro` (stage intervene@{layer})")
        frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
        alphas = sorted(frame["alpha"].unique().tolist())
        if len(alphas) != len(config.alpha_sweep) or not np.allclose(alphas, config.alpha_sweep):
            raise UserError(f"{path} holds alphas {alphas} but the sweep is {list(config.alpha_sweep)}; "
                            f"it is stale: rerun intervene@{layer}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def per_feature_table(config: Config) -> pd.DataFrame:
    metrics = load_layer_tables(config)
    features = artifacts.read_features(config.layers).rename(columns={"density": "source_density", "max_act": "source_max_act"})
    keep = ["layer", "feature", "label", "source", "source_density", "source_max_act", "neuronpedia_url",
            "np_pos_tokens", "np_neg_tokens"]
    merged = metrics.merge(features[keep], on=["layer", "feature"], how="left", validate="many_to_one")
    unlabeled = merged[merged["source"].isna()]
    if len(unlabeled):
        row = unlabeled.iloc[0]
        raise UserError(f"layer {row['layer']} feature {row['feature']} has metrics but is not in "
                        f"{artifacts.FEATURES}; rerun intervene@{row['layer']}")
    merged["is_headline"] = merged["alpha"] == config.alpha
    return merged[artifacts.PER_FEATURE_COLUMNS].sort_values(["layer", "feature", "alpha"], kind="stable")


def per_layer_table(per_feature: pd.DataFrame) -> pd.DataFrame:
    grouped = per_feature.groupby(["layer", "alpha"], sort=True)
    out = grouped.agg(
        n_features=("feature", "nunique"),
        ce_clean=("ce_clean", "mean"),
        delta_ce_mean=("delta_ce", "mean"),
        delta_ce_std=("delta_ce", "std"),
        delta_ce_min=("delta_ce", "min"),
        delta_ce_max=("delta_ce", "max"),
        kl_mean=("kl", "mean"),
        kl_std=("kl", "std"),
        kl_min=("kl", "min"),
        kl_max=("kl", "max"),
        delta_ce_live_mean=("delta_ce_live", "mean"),
        kl_live_mean=("kl_live", "mean"),
        frac_live_mean=("frac_live", "mean"),
    )
    return out.reset_index()


METRIC_COLUMNS = ["ce_clean", "ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", "live_threshold", "n_live",
                  "frac_live", "mean_act_live", "delta_ce_live", "kl_live", "density", "max_act"]


def sanity(per_feature: pd.DataFrame, identity: float | None) -> dict[str, Any]:
    """Checks computed from the data: they belong in the report next to the numbers.

    NaN is allowed by definition only in the live-position means when no position is live, and
    in the standard errors of a single passage; anything else is counted as unexpected."""
    metrics = per_feature[METRIC_COLUMNS]
    allowed = pd.DataFrame(False, index=metrics.index, columns=metrics.columns)
    no_live = per_feature["n_live"] == 0
    for col in ("delta_ce_live", "kl_live", "mean_act_live"):
        allowed[col] = no_live
    for col in ("delta_ce_se", "kl_se"):
        allowed[col] = per_feature["n_passages"] < 2
    out: dict[str, Any] = {
        "nan_values": int((metrics.isna() & ~allowed).to_numpy().sum()),
        "nan_live_rows": int(no_live.sum()),
        "kl_min": float(per_feature["kl"].min()),
        "kl_negative_rows": int((per_feature["kl"] < -artifacts.KL_TOLERANCE).sum()),
    }
    if identity is not None:
        ident = per_feature[per_feature["alpha"] == identity]
        nonzero = (ident["delta_ce"] != 0) | (ident["kl"] != 0)
        out["identity_alpha"] = identity
        out["identity_rows"] = int(len(ident))
        out["identity_rows_nonzero"] = int(nonzero.sum())
    return out


def summary(per_feature: pd.DataFrame, config: Config, identity: float | None) -> dict[str, Any]:
    head = per_feature[per_feature["alpha"] == config.alpha]
    strongest = head.loc[head["kl"].idxmax()] if len(head) else None

    def r(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(f"{float(x):.6g}")

    per_layer = {
        f"layer_{int(layer)}": {"delta_ce": r(g["delta_ce"].mean()), "kl": r(g["kl"].mean())}
        for layer, g in head.groupby("layer")
    }
    return {
        "alpha": config.alpha,
        "intervention": config.intervention,
        "n_layers": int(head["layer"].nunique()),
        "n_features": int(len(head)),
        "mean_delta_ce": r(head["delta_ce"].mean()),
        "mean_kl": r(head["kl"].mean()),
        "mean_delta_ce_live": r(head["delta_ce_live"].mean()),
        "mean_kl_live": r(head["kl_live"].mean()),
        "max_kl": {
            "layer": int(strongest["layer"]) if strongest is not None else None,
            "feature": int(strongest["feature"]) if strongest is not None else None,
            "kl": r(strongest["kl"]) if strongest is not None else None,
        },
        "per_layer": per_layer,
        "sanity": sanity(per_feature, identity),
    }


GENERATION_HEADLINE = ("concept_act", "concept_act_clean", "loss", "loss_clean", "distinct_2", "distinct_2_clean",
                       "promoted_frac", "promoted_frac_clean", "frac_changed")


def generation_summary(layers: tuple[int, ...]) -> dict[str, Any]:
    """summary.json's `generation`: per value of generate_alphas, the sampled continuations' measures
    (metrics/generation.csv, stage generate) averaged over every layer and feature."""
    table = artifacts.read_generation_metrics()
    if sorted(table["layer"].unique().tolist()) != sorted(layers):
        raise UserError(f"{artifacts.GENERATION_METRICS} covers layers {sorted(table['layer'].unique().tolist())} "
                        f"but params `layers` is {list(layers)}; it is stale: rerun `dvc repro generate`")
    sampled = table[table["decoding"] == "sampled"]
    by_alpha = {f"alpha_{a:g}": {k: (None if math.isnan(v) else float(f"{v:.6g}"))
                                 for k, v in g[list(GENERATION_HEADLINE)].mean().items()}
                for a, g in sampled.groupby("alpha", sort=True)}
    return {"decoding": "sampled", "n_features": int(sampled[["layer", "feature"]].drop_duplicates().shape[0]),
            "by_alpha": by_alpha}


def run_aggregate_stage(config: Config | StageParams) -> dict[str, Any]:
    config = StageParams.of(config, "aggregate", PARAMS)
    with stage_record("aggregate"):
        per_feature = per_feature_table(config)
        per_layer = per_layer_table(per_feature)
        result = summary(per_feature, config, INTERVENTION_IDENTITY[config.intervention])
        result["generation"] = generation_summary(config.layers)
        artifacts.write_per_feature(per_feature)
        write_csv(artifacts.PER_LAYER, per_layer)
        write_json(artifacts.SUMMARY, result)
    return result
