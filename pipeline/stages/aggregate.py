"""Stage `aggregate`: per-layer tables -> the study's tables and DVC metrics.

- metrics/per_feature_metrics.csv: one row per (layer, feature, alpha), every column of
  pipeline.core.columns.PER_FEATURE: the layer tables, the feature's label, source and Neuronpedia link,
  and the study-wide verdicts of pipeline.stats.study (docs/statistics.md);
- metrics/per_layer_summary.csv: per (layer, alpha), the aggregates of pipeline.core.columns.PER_LAYER;
- metrics/summary.json: the headline at `alpha` (the columns the schema marks `headline`, the largest KL, the
  test counts, three sanity counts): small, so `dvc exp show` fits a screen and `dvc metrics diff` compares it;
- metrics/summary_details.json: what summary.json leaves out: the headline per layer, steered generation's
  measures per value, and the sanity checks with the numbers the report states
  (`dvc metrics diff --targets metrics/summary_details.json`).
Only the layers in params `layers` are read, so files left from a run with other layers never
leak in; a per-layer file whose alphas differ from the current sweep is refused as stale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import artifacts, columns
from pipeline.core.columns import GENERATION_HEADLINE, HEADLINE, METRIC_COLUMNS, PER_FEATURE, PER_LAYER
from pipeline.core.errors import UserError
from pipeline.core.io import write_csv, write_json
from pipeline.core.modes import MODES
from pipeline.core.params.config import Config
from pipeline.core.params.stage_params import StageParams
from pipeline.core.runinfo import stage_record
from pipeline.stats.nan_rules import nan_allowed
from pipeline.stats.resampling import FWER, N_FAMILIES
from pipeline.stats.study import add_study_tests, test_counts

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("layers", "preset", "alpha", "alpha_sweep", "intervention")
# A KL recomputed from float32 logits can come out at about -1e-9 where it is exactly 0.
KL_TOLERANCE = 1e-6


def load_layer_tables(config: Config) -> pd.DataFrame:
    frames = []
    for layer in config.layers:
        path = artifacts.layer_metrics(layer)
        if not path.exists():
            raise UserError(f"{path} not found; run `dvc repro` (stage intervene)")
        frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
        alphas = sorted(frame["alpha"].unique().tolist())
        if len(alphas) != len(config.alpha_sweep) or not np.allclose(alphas, config.alpha_sweep):
            raise UserError(f"{path} holds alphas {alphas} but the sweep is {list(config.alpha_sweep)}; "
                            "it is stale: rerun the intervene stage")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def per_feature_table(config: Config) -> pd.DataFrame:
    metrics = load_layer_tables(config)
    features = artifacts.read_features(config.layers).rename(columns={"density": "source_density",
                                                                       "max_act": "source_max_act"})
    joined = ["layer", "feature", *(c.name for c in PER_FEATURE if c.table == "features")]
    merged = metrics.merge(features[joined], on=["layer", "feature"], how="left", validate="many_to_one")
    unlabeled = merged[merged["source"].isna()]
    if len(unlabeled):
        row = unlabeled.iloc[0]
        raise UserError(f"layer {row['layer']} feature {row['feature']} has metrics but is not in "
                        f"{artifacts.FEATURES}; rerun the intervene stage")
    merged["is_headline"] = merged["alpha"] == config.alpha
    merged = add_study_tests(merged, MODES[config.intervention].identity)
    return merged[list(columns.PER_FEATURE_COLUMNS)].sort_values(["layer", "feature", "alpha"], kind="stable")


def per_layer_table(per_feature: pd.DataFrame) -> pd.DataFrame:
    grouped = per_feature.groupby(["layer", "alpha"], sort=True)
    out = grouped.agg(**{a.name: (a.of, a.how) for a in PER_LAYER})
    return out.reset_index()


def _r(x: Any) -> float | None:
    """A JSON number with six significant digits, or null for NaN."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(f"{float(x):.6g}")


def sanity(per_feature: pd.DataFrame, identity: float | None) -> dict[str, Any]:
    """The study's sanity checks, computed from the data once; the report states them (pipeline.report.findings).

    - identity: at the value that leaves the model untouched, every row's ΔCE and KL (all and live) is 0;
    - kl: no KL below -KL_TOLERANCE (all-position and live);
    - nan: no NaN in a metric column except where pipeline.stats.nan_rules allows it, and no infinity;
    - clean_ce: every row measures against the same clean model and tokens."""
    pf = per_feature
    out: dict[str, Any] = {"identity": {"alpha": identity}}
    if identity is not None:
        rows = pf[pf["alpha"] == identity]
        effect = rows[["delta_ce", "kl", "delta_ce_live", "kl_live"]].abs()
        out["identity"] |= {"rows": int(len(rows)), "rows_nonzero": int((effect.fillna(0) != 0).any(axis=1).sum()),
                            "max_abs_delta_ce": _r(effect["delta_ce"].max()) if len(rows) else None,
                            "max_kl": _r(effect["kl"].max()) if len(rows) else None}
    kls = pd.concat([pf["kl"], pf["kl_live"]]).dropna()
    out["kl"] = {"values": int(len(kls)), "min": _r(kls.min()) if len(kls) else None,
                 "below_tolerance": int((kls < -KL_TOLERANCE).sum()), "tolerance": KL_TOLERANCE}
    cols = [c for c in METRIC_COLUMNS if c in pf.columns]
    values = pf[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    rules = nan_allowed(pf)
    allowed = np.column_stack([rules[c].to_numpy(dtype=bool) if c in rules else np.zeros(len(pf), bool)
                               for c in cols]) if cols else np.zeros((len(pf), 0), bool)
    unexpected = ~np.isfinite(values) & ~(allowed & np.isnan(values))  # an infinity is never allowed
    first = None
    if unexpected.any():
        i, j = map(int, np.argwhere(unexpected)[0])
        row = pf.iloc[i]
        first = {"column": cols[j], "layer": int(row["layer"]), "feature": int(row["feature"]),
                 "alpha": float(row["alpha"])}
    out["nan"] = {"unexpected": int(unexpected.sum()), "measurements": int(values.size), "columns": len(cols),
                  "rows": int(len(pf)), "first": first, "no_live_rows": int((pf["n_live"] == 0).sum())}
    spread = float(pf["ce_clean"].max() - pf["ce_clean"].min()) if len(pf) else 0.0
    mean = float(pf["ce_clean"].mean()) if len(pf) else math.nan
    out["clean_ce"] = {"mean": _r(mean), "spread": _r(spread),
                       "same": bool(spread <= 1e-6 * max(1.0, abs(mean))) if len(pf) else True}
    return out


def _strongest(head: pd.DataFrame, column: str) -> dict[str, Any]:
    rows = head[head[column].notna()]
    if not len(rows):
        return {"layer": None, "feature": None, column: None}
    row = rows.loc[rows[column].idxmax()]
    return {"layer": int(row["layer"]), "feature": int(row["feature"]), column: _r(row[column])}


def _headline(rows: pd.DataFrame) -> dict[str, float | None]:
    """The schema's headline columns over `rows`, each by its own aggregate (mean or median)."""
    return {f"{c.headline}_{c.name}": _r(getattr(rows[c.name], c.headline)()) for c in HEADLINE}


def summary(per_feature: pd.DataFrame, config: Config, checks: dict[str, Any]) -> dict[str, Any]:
    """metrics/summary.json: the headline at `alpha` (effects where the feature fires first, the all-token means
    beside them), the study-wide test counts (every alpha) and the sanity counts, for `dvc metrics diff`."""
    head = per_feature[per_feature["alpha"] == config.alpha]
    counts = test_counts(per_feature)
    return {
        "alpha": config.alpha,
        "intervention": config.intervention,
        "n_layers": int(head["layer"].nunique()),
        "n_features": int(len(head)),
        **_headline(head),
        "max_kl_live": _strongest(head, "kl_live"),
        "max_kl": _strongest(head, "kl"),
        "tests": {
            "method": "sign-flip by document (null: symmetric about 0), Holm-adjusted across the study",
            "fwer": FWER,
            "fwer_study": N_FAMILIES * FWER,
            "n_tests": counts["tests"],
            "n_significant": counts["significant"],
            "n_too_rare": counts["too_rare"],
            "n_not_shown": counts["not_shown"],
            "random_method": "t on log live KL against the draws, K - 1 df, Holm-adjusted across the study",
            "n_random_tests": counts["random_tests"],
            "n_more_than_random": counts["more_than_random"],
            "n_less_than_random": counts["less_than_random"],
        },
        "sanity": {"nan_values": checks["nan"]["unexpected"], "kl_negative_rows": checks["kl"]["below_tolerance"],
                   "identity_rows_nonzero": checks["identity"].get("rows_nonzero")},
    }


def per_layer_headline(per_feature: pd.DataFrame, alpha: float) -> dict[str, dict[str, float | None]]:
    """summary_details.json's `per_layer`: the headline columns within each layer at `alpha`."""
    head = per_feature[per_feature["alpha"] == alpha]
    return {f"layer_{int(layer)}": _headline(g) for layer, g in head.groupby("layer")}


def generation_summary(layers: tuple[int, ...]) -> dict[str, Any]:
    """summary_details.json's `generation`: per value of generate_alphas, the sampled continuations' measures
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
        checks = sanity(per_feature, MODES[config.intervention].identity)
        result = summary(per_feature, config, checks)
        details = {"per_layer": per_layer_headline(per_feature, config.alpha),
                   "generation": generation_summary(config.layers), "sanity": checks}
        artifacts.write_per_feature(per_feature)
        write_csv(artifacts.PER_LAYER, per_layer)
        write_json(artifacts.SUMMARY_DETAILS, details)
        write_json(artifacts.SUMMARY, result)
    return result
