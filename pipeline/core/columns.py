"""Every column the study writes, declared once: its name, its meaning, when it may be NaN, and where it goes.

docs/outputs.md is the reader's side of this file. Every column list of the pipeline is built from here:
the per-layer tables `intervene` writes (metrics/layers/layer_L.csv: the columns with `table == "layer"`, in
the order the stage computes them), the per-feature table `aggregate` writes (metrics/per_feature_metrics.csv:
every `PER_FEATURE` column in this order), the per-layer summary (`PER_LAYER`), data/features.csv
(`FEATURE_COLUMNS`) and metrics/generation.csv (`GENERATION_COLUMNS`). `nan_when` names the condition under
which a column is NaN by definition (the conditions are computed in pipeline.stats.nan_rules; anything else
NaN is an error `intervene` refuses and `aggregate` counts). `headline` marks what summary.json reports at
the headline alpha, the file `dvc metrics diff` and `dvc exp show` compare.

Adding a metric column: declare it here, compute it where its table is built, and (if it can be NaN) name
its condition. Torch- and pandas-free, so anything may import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    meaning: str
    table: str  # "layer": written by intervene (and carried on); "study": added by aggregate; "features": joined in
    kind: str = "metric"  # "metric" (a measurement, checked for NaN), "key", "flag", "test", "text"
    nan_when: str | None = None  # pipeline.stats.nan_rules condition under which it is NaN by definition
    headline: str | None = None  # "mean" or "median": summary.json reports it over the features at `alpha`


def _interval(name: str, what: str, nan_when: str) -> tuple[Column, ...]:
    return (Column(f"{name}_se", f"standard error of {what} (document resampling, docs/statistics.md)", "layer",
                   nan_when=nan_when),
            Column(f"{name}_lo", f"lower end of the 95% bootstrap-t interval of {what}", "layer", nan_when=nan_when),
            Column(f"{name}_hi", f"upper end of the 95% bootstrap-t interval of {what}", "layer", nan_when=nan_when))


def _se_lo_hi(columns: tuple[Column, ...]) -> tuple[Column, Column, Column]:
    return columns[0], columns[1], columns[2]


_DCE_LIVE = _se_lo_hi(_interval("delta_ce_live", "the live ΔCE", "few_live_docs"))
_KL_LIVE = _se_lo_hi(_interval("kl_live", "the live KL", "few_live_docs"))
_DCE = _se_lo_hi(_interval("delta_ce", "the all-position ΔCE", "few_docs"))
_KL = _se_lo_hi(_interval("kl", "the all-position KL", "few_docs"))

PER_FEATURE: tuple[Column, ...] = (
    Column("layer", "residual-stream layer L (hook blocks.L.hook_resid_post)", "layer", kind="key"),
    Column("feature", "SAE feature index", "layer", kind="key"),
    Column("label", "what the feature means, from its source", "features", kind="text"),
    Column("alpha", "the swept value (α for scale, c for clamp and add)", "layer", kind="key"),
    Column("intervention", "the intervention mode (pipeline.core.modes)", "layer", kind="key"),
    Column("is_headline", "the row is at the headline alpha", "layer", kind="flag"),
    Column("delta_ce_live", "mean change of cross-entropy (nats) over the feature's live positions", "layer",
           nan_when="no_live", headline="mean"),
    *_DCE_LIVE,
    Column("kl_live", "mean KL(clean || intervened) (nats) over live positions", "layer", nan_when="no_live",
           headline="mean"),
    *_KL_LIVE,
    Column("p_delta_ce_live", "two-sided sign-flip p by document: null, each document's live ΔCE sum is symmetric "
                              "about 0", "layer", nan_when="no_live"),
    Column("min_p_delta_ce_live", "the smallest p that test could give with this many documents", "layer",
           nan_when="no_live"),
    Column("p_adj_delta_ce_live", "Holm-adjusted p across the study (NaN: no test, e.g. at the identity value)",
           "study", kind="test"),
    Column("testable", "some outcome of the row's own test could pass Holm (False: too rare to test)", "study",
           kind="flag"),
    Column("significant", "p_adj_delta_ce_live <= FWER: moves the loss one way", "study", kind="flag"),
    Column("ctrl_delta_ce_live", "live ΔCE of the random-direction controls (mean over draws)", "layer",
           nan_when="no_ctrl_live"),
    Column("ctrl_kl_live", "live KL of the random-direction controls (mean over draws)", "layer",
           nan_when="no_ctrl_live", headline="mean"),
    Column("ctrl_kl_live_min", "smallest live KL among the draws", "layer", nan_when="no_ctrl_live"),
    Column("ctrl_kl_live_max", "largest live KL among the draws", "layer", nan_when="no_ctrl_live"),
    Column("ctrl_log_kl_live_sd", "standard deviation of log live KL across the draws", "layer",
           nan_when="no_spread"),
    Column("ctrl_draws", "random-direction draws run for the row", "layer"),
    Column("ctrl_draws_above", "draws that moved the model at least as much as the feature", "layer",
           nan_when="no_ctrl_live"),
    Column("kl_ratio_random", "live KL over the draws' geometric mean", "layer", nan_when="no_ratio",
           headline="median"),
    Column("p_vs_random", "two-sided t-test p of the feature's log live KL against the draws'", "layer",
           nan_when="no_random_test"),
    Column("p_adj_vs_random", "Holm-adjusted p_vs_random across the study", "study", kind="test"),
    Column("more_than_random", "p_adj_vs_random <= FWER and live KL above the draws'", "study", kind="flag"),
    Column("less_than_random", "p_adj_vs_random <= FWER and live KL below the draws'", "study", kind="flag"),
    Column("dose_rel_norm", "mean over live positions of ||Δx_t|| / ||x_t||", "layer", nan_when="no_live"),
    Column("push_max_act", "mean push along the decoder direction over live positions, in max activations",
           "layer", nan_when="no_live"),
    Column("delta_ce", "mean change of cross-entropy (nats) over every scored position", "layer", headline="mean"),
    *_DCE,
    Column("kl", "mean KL(clean || intervened) (nats) over every scored position", "layer", headline="mean"),
    *_KL,
    Column("ctrl_delta_ce", "all-position ΔCE of the random-direction controls (mean over draws)", "layer",
           nan_when="no_ctrl"),
    Column("ctrl_kl", "all-position KL of the random-direction controls (mean over draws)", "layer",
           nan_when="no_ctrl"),
    Column("sae_context_size", "the context length the SAE was trained on", "layer", nan_when="no_ctx"),
    Column("frac_live_beyond_ctx", "share of live positions at t >= the SAE's context", "layer",
           nan_when="no_ctx_live"),
    Column("delta_ce_live_in_ctx", "live ΔCE over positions t < the SAE's context", "layer", nan_when="none_in_ctx"),
    Column("kl_live_in_ctx", "live KL over positions t < the SAE's context", "layer", nan_when="none_in_ctx"),
    Column("n_docs", "documents the passages come from", "layer"),
    Column("n_docs_live", "documents with live positions", "layer"),
    Column("n_passages_live", "passages with live positions", "layer"),
    Column("n_docs_firing", "documents where the feature fires", "layer"),
    Column("n_passages_firing", "passages where the feature fires", "layer"),
    Column("n_live", "live positions: |activation| above max(0, its live_percentile)", "layer"),
    Column("frac_live", "share of scored positions that are live", "layer"),
    Column("mean_act_live", "mean activation over live positions", "layer", nan_when="no_live"),
    Column("live_threshold", "the activation a position must exceed to be live", "layer"),
    Column("ce_clean", "mean clean cross-entropy (nats) over scored positions", "layer"),
    Column("ce_int", "mean intervened cross-entropy (nats) over scored positions", "layer"),
    Column("density", "share of scored positions where the feature fires (activation != 0)", "layer"),
    Column("max_act", "largest |activation| on the corpus", "layer"),
    Column("source_density", "density as the feature source measured it", "features", kind="text"),
    Column("source_max_act", "largest activation the feature source saw", "features", kind="text"),
    Column("top_promoted", "tokens whose logits rise most at live positions (JSON [token, mean delta])", "layer",
           kind="text"),
    Column("top_suppressed", "tokens whose logits fall most at live positions", "layer", kind="text"),
    Column("np_pos_tokens", "Neuronpedia's top promoted logit tokens", "features", kind="text"),
    Column("np_neg_tokens", "Neuronpedia's top suppressed logit tokens", "features", kind="text"),
    Column("neuronpedia_url", "the feature's Neuronpedia page", "features", kind="text"),
    Column("source", "which feature source chose it (csv, neuronpedia, auto)", "features", kind="text"),
    Column("n_passages", "passages scored", "layer"),
    Column("n_scored", "scored positions (passages x (max_len - 2))", "layer"),
)
PER_FEATURE_COLUMNS: tuple[str, ...] = tuple(c.name for c in PER_FEATURE)
LAYER_COLUMNS: frozenset[str] = frozenset(c.name for c in PER_FEATURE if c.table == "layer")
METRIC_COLUMNS: tuple[str, ...] = tuple(c.name for c in PER_FEATURE if c.kind == "metric")
NAN_WHEN: dict[str, str] = {c.name: c.nan_when for c in PER_FEATURE if c.nan_when is not None}
HEADLINE: tuple[Column, ...] = tuple(c for c in PER_FEATURE if c.headline is not None)


@dataclass(frozen=True)
class LayerAggregate:
    """A column of metrics/per_layer_summary.csv: `how` of per-feature column `of` over a (layer, alpha)'s features."""

    name: str
    of: str
    how: str  # a pandas aggregation: mean, std, min, max, median, sum, nunique


PER_LAYER: tuple[LayerAggregate, ...] = (
    LayerAggregate("n_features", "feature", "nunique"),
    LayerAggregate("ce_clean", "ce_clean", "mean"),
    *(LayerAggregate(f"{of}_{how}", of, how) for of in ("delta_ce", "kl") for how in ("mean", "std", "min", "max")),
    LayerAggregate("delta_ce_live_mean", "delta_ce_live", "mean"),
    LayerAggregate("kl_live_mean", "kl_live", "mean"),
    LayerAggregate("ctrl_kl_live_mean", "ctrl_kl_live", "mean"),
    LayerAggregate("kl_ratio_random_median", "kl_ratio_random", "median"),
    LayerAggregate("n_significant", "significant", "sum"),
    LayerAggregate("n_more_than_random", "more_than_random", "sum"),
    LayerAggregate("n_less_than_random", "less_than_random", "sum"),
    LayerAggregate("frac_live_mean", "frac_live", "mean"),
)

# data/features.csv, as every feature source writes it (pipeline.sources.selection.FeatureChoice).
FEATURE_COLUMNS: tuple[str, ...] = (
    "layer", "feature", "label", "source", "density", "max_act", "neuronpedia_url",
    "np_pos_tokens", "np_neg_tokens", "reason",
)


@dataclass(frozen=True)
class GenerationMeasure:
    """A measure of steered continuations (pipeline.engine.generation_metrics computes it); generation.csv has
    it and `{name}_clean`, the same measure of the clean model's continuations of the same prompts."""

    name: str
    meaning: str
    headline: bool  # reported per value in metrics/summary_details.json's generation


GENERATION_MEASURES: tuple[GenerationMeasure, ...] = (
    GenerationMeasure("concept_act", "mean SAE activation of the feature on the generated tokens", True),
    GenerationMeasure("concept_frac", "share of generated tokens where the feature fires", False),
    GenerationMeasure("loss", "the clean model's mean per-token loss on the generated tokens", True),
    GenerationMeasure("distinct_1", "distinct unigrams / unigrams", False),
    GenerationMeasure("distinct_2", "distinct bigrams / bigrams", True),
    GenerationMeasure("repetition", "share of 4-grams repeating an earlier one", False),
    GenerationMeasure("promoted_frac", "share of generated tokens among the feature's top promoted tokens", True),
)
GENERATION_COLUMNS: tuple[str, ...] = (
    "layer", "feature", "alpha", "intervention", "decoding", "n_prompts",
    *(c for m in GENERATION_MEASURES for c in (m.name, f"{m.name}_clean")), "frac_changed",
)
GENERATION_HEADLINE: tuple[str, ...] = (
    *(c for m in GENERATION_MEASURES if m.headline for c in (m.name, f"{m.name}_clean")), "frac_changed",
)

# metrics/screen/layer_L.csv, stage `screen` (pipeline.engine.attribution.LayerScreen.table): one row per SAE feature.
SCREEN_COLUMNS: tuple[str, ...] = (
    "layer", "feature", "density", "n_firing", "max_act", "mean_act_firing", "slope_delta_ce", "slope_per_firing",
    "alpha", "est_delta_ce", "rank", "rank_per_firing", "verified",
)
# data/screen/layer_L.csv, what `features` reads: the same without the headline alpha's columns.
SCREEN_RANK_COLUMNS: tuple[str, ...] = tuple(c for c in SCREEN_COLUMNS if c not in ("alpha", "est_delta_ce", "verified"))
# The screen's estimates of a verified feature's delta_ce: the `screen_estimator` value that asks for it -> its column
# in verification.csv (and its name in agreement.csv's `estimator`). first_order is always verified.
SCREEN_ESTIMATES: dict[str, str] = {"first_order": "estimate", "second_order": "estimate_2"}
# metrics/screen/verification.csv: one row per verified feature and value of the sweep (pipeline.engine.screen_check).
SCREEN_VERIFICATION_COLUMNS: tuple[str, ...] = (
    "layer", "feature", "group", "alpha", "n_firing", "density", "slope_delta_ce", *SCREEN_ESTIMATES.values(), "exact",
)
# metrics/screen/agreement.csv: per (layer, alpha, estimator, subset) (pipeline.stats.screen_agreement).
SCREEN_AGREEMENT_COLUMNS: tuple[str, ...] = (
    "layer", "alpha", "estimator", "subset", "n_features", "spearman", "spearman_lo", "spearman_hi", "pearson",
    "spearman_per_firing", "sign_agreement", "top_n", "top_overlap", "median_abs_rel_error",
)
# metrics/screen/agreement.json, for `dvc metrics diff --targets`: these figures per layer, alpha and subset.
SCREEN_AGREEMENT_SUMMARY: tuple[str, ...] = ("spearman", "pearson", "sign_agreement", "top_overlap")
