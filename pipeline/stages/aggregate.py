"""Stage `aggregate`: per-layer tables -> the study's tables and DVC metrics.

- metrics/per_feature_metrics.csv: one row per (layer, feature, alpha), with the feature's label,
  source and Neuronpedia link joined in, and the study-wide tests (docs/statistics.md): Holm-adjusted
  p-values over every (layer, feature, alpha other than the identity) with a test, one family per
  question (`p_adj_delta_ce_live`, `p_adj_vs_random`), whether any outcome of a row's own test could make
  it significant (`testable`), and the verdicts at FWER 0.05 per family (`significant`,
  `more_than_random`, `less_than_random`);
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
from pipeline.engine.inference import INFERENCE_COLUMNS, nan_allowed
from pipeline.engine.resampling import FWER, N_FAMILIES, holm, holm_reachable
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
    merged = add_study_tests(merged, INTERVENTION_IDENTITY[config.intervention])
    return merged[artifacts.PER_FEATURE_COLUMNS].sort_values(["layer", "feature", "alpha"], kind="stable")


def add_study_tests(frame: pd.DataFrame, identity: float | None) -> pd.DataFrame:
    """Holm-adjusted p-values across the whole study, one family per question (does the loss move one way where
    the feature fires; does the feature's direction move the model unlike a random one), each over the rows
    that are a test: a value other than the intervention's identity, with a p-value. `significant` is read
    first; a row is `testable` unless no outcome of its own sign-flip test (its p at its floor `min_p`, every
    other p as observed) could pass Holm, so significant + too rare + not shown = the tests."""
    out = frame.copy()
    is_test_row = out["alpha"] != identity if identity is not None else pd.Series(True, index=out.index)
    p = out["p_delta_ce_live"].where(is_test_row)
    out["p_adj_delta_ce_live"] = holm(p.to_numpy())
    out["significant"] = out["p_adj_delta_ce_live"] <= FWER
    out["testable"] = holm_reachable(p.to_numpy(), out["min_p_delta_ce_live"].to_numpy())
    p_random = out["p_vs_random"].where(is_test_row)
    out["p_adj_vs_random"] = holm(p_random.to_numpy())
    beyond = out["p_adj_vs_random"] <= FWER
    out["more_than_random"] = beyond & (out["kl_ratio_random"] > 1)
    out["less_than_random"] = beyond & (out["kl_ratio_random"] < 1)
    return out


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
        ctrl_kl_live_mean=("ctrl_kl_live", "mean"),
        kl_ratio_random_median=("kl_ratio_random", "median"),
        n_significant=("significant", "sum"),
        n_more_than_random=("more_than_random", "sum"),
        n_less_than_random=("less_than_random", "sum"),
        frac_live_mean=("frac_live", "mean"),
    )
    return out.reset_index()


METRIC_COLUMNS = ["ce_clean", "ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", *INFERENCE_COLUMNS, "live_threshold",
                  "n_live",
                  "frac_live", "mean_act_live", "delta_ce_live", "kl_live", "density", "max_act"]


def sanity(per_feature: pd.DataFrame, identity: float | None) -> dict[str, Any]:
    """Checks computed from the data: they belong in the report next to the numbers.

    NaN is allowed only where a column's definition makes it so (pipeline.engine.inference.nan_allowed, the
    rule intervene checks too); anything else is counted as unexpected."""
    metrics = per_feature[[c for c in METRIC_COLUMNS if c in per_feature]]
    rules = nan_allowed(per_feature)
    allowed = pd.DataFrame({c: rules[c] if c in rules else False for c in metrics.columns}, index=metrics.index)
    no_live = per_feature["n_live"] == 0
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
    """The headline at `alpha`: effects where the feature fires (live positions) first, the all-token means
    beside them, and the study-wide test counts (every alpha), for `dvc metrics diff`."""
    head = per_feature[per_feature["alpha"] == config.alpha]

    def r(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(f"{float(x):.6g}")

    def strongest(column: str) -> dict[str, Any]:
        rows = head[head[column].notna()]
        if not len(rows):
            return {"layer": None, "feature": None, column: None}
        row = rows.loc[rows[column].idxmax()]
        return {"layer": int(row["layer"]), "feature": int(row["feature"]), column: r(row[column])}

    per_layer = {
        f"layer_{int(layer)}": {"delta_ce_live": r(g["delta_ce_live"].mean()), "kl_live": r(g["kl_live"].mean()),
                                "delta_ce": r(g["delta_ce"].mean()), "kl": r(g["kl"].mean())}
        for layer, g in head.groupby("layer")
    }
    tests = per_feature[per_feature["p_adj_delta_ce_live"].notna()]
    versus = per_feature[per_feature["p_adj_vs_random"].notna()]
    return {
        "alpha": config.alpha,
        "intervention": config.intervention,
        "n_layers": int(head["layer"].nunique()),
        "n_features": int(len(head)),
        "mean_delta_ce_live": r(head["delta_ce_live"].mean()),
        "mean_kl_live": r(head["kl_live"].mean()),
        "mean_ctrl_kl_live": r(head["ctrl_kl_live"].mean()),
        "median_kl_ratio_random": r(head["kl_ratio_random"].median()),
        "mean_delta_ce": r(head["delta_ce"].mean()),
        "mean_kl": r(head["kl"].mean()),
        "max_kl_live": strongest("kl_live"),
        "max_kl": strongest("kl"),
        "tests": {
            "method": "sign-flip by document (null: symmetric about 0), Holm-adjusted across the study",
            "fwer": FWER,
            "fwer_study": N_FAMILIES * FWER,
            "n_tests": int(len(tests)),
            "n_significant": int(tests["significant"].sum()),
            "n_too_rare": int((~tests["testable"].astype(bool)).sum()),
            "n_not_shown": int((tests["testable"].astype(bool) & ~tests["significant"].astype(bool)).sum()),
            "random_method": "t on log live KL against the draws, K - 1 df, Holm-adjusted across the study",
            "n_random_tests": int(len(versus)),
            "n_more_than_random": int(versus["more_than_random"].sum()),
            "n_less_than_random": int(versus["less_than_random"].sum()),
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
