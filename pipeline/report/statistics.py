"""The report's statistics: the intervention and uncertainty method as this run used them, and the
study-wide tests (does the loss move where the feature fires; is the feature's effect unlike its random
controls'), every sentence filled from metrics/per_feature_metrics.csv and worded for the chosen
intervention (pipeline.intervention_words)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.engine.resampling import EXACT_MAX_DOCS, FWER, N_BOOT, N_FLIPS
from pipeline.intervention_words import words_for
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import h, num, pct, raw_html

_FORMULAS = {
    "scale": (r"x_t \;\longmapsto\; x_t + (\alpha - 1)\, a_i(x_t)\, W_\text{dec}[i]",
              "This is the same as splicing the SAE into the model with its reconstruction error kept and "
              "multiplying feature $i$'s activation by $\\alpha$: at $\\alpha = 1$ the model is exactly the clean "
              "model, at $\\alpha = 0$ the feature is ablated."),
    "clamp": (r"x_t \;\longmapsto\; x_t + (c - a_i(x_t))\, W_\text{dec}[i]",
              "This sets feature $i$'s activation to $c$ at every position, with the SAE's reconstruction error "
              "kept. No single $c$ is the clean model: each position's own clean activation would be."),
    "add": (r"x_t \;\longmapsto\; x_t + c\, W_\text{dec}[i]",
            "This pushes the residual stream by $c$ times the feature's decoder direction at every position, "
            "whatever the feature's activation: $c = 0$ is the clean model."),
}


def intervention_fragment(inputs: ReportInputs) -> str:
    formula, meaning = _FORMULAS[inputs.intervention]
    return (f"At the hook $h$ = `{inputs.model.hook}` of layer $L$, let $x_t$ be the residual stream at position $t$, "
            "$a_i(x_t)$ the activation of SAE feature $i$ computed by the SAE's encoder, and $W_\\text{dec}[i]$ the "
            f"feature's decoder direction. The `{inputs.intervention}` intervention replaces the residual stream at "
            "every position except the first (which holds BOS):\n\n"
            f"$$\n{formula}, \\qquad t \\ge 1 .\n$$\n\n{meaning} The rest of the forward pass runs unchanged from the "
            "edited residual stream; each layer is intervened on by itself.\n")


def statistics_method_fragment(inputs: ReportInputs) -> str:
    pf = inputs.per_feature
    words = words_for(inputs.intervention)
    n_docs = int(pf["n_docs"].iloc[0])
    n_passages = int(pf["n_passages"].iloc[0])
    draws = "no random-direction controls (`control_draws: 0`)"
    if pf["ctrl_kl"].notna().any():
        draws = "random-direction controls"
    ctx = pf["sae_context_size"].dropna()
    parts = [
        f"- **Unit of resampling: the document.** The {n_passages} passages come from {n_docs} documents of the "
        "corpus (passages cut from one article are not independent). Intervals are 95% percentile intervals of a "
        f"document bootstrap ({N_BOOT:,} resamples of the documents, each metric as the ratio of document sums).",
        "- **Tests.** For each (layer, feature, value other than the identity), a two-sided sign-flip test by "
        "document of “the mean ΔCE over live positions is 0” (exact over all sign vectors up to "
        f"{EXACT_MAX_DOCS} documents, else {N_FLIPS:,} random ones), and one of “the live KL equals the random "
        "controls' live KL”, paired position by position. The p-values are adjusted with **Holm's** method across "
        f"the whole study, one family per question, and a verdict holds the family-wise error rate at {FWER:g}. "
        "A feature that fires in k documents cannot reach a p-value below 2 / 2^k: where even that could not pass "
        "Holm's first threshold, the row is marked *too rare to test* rather than “no effect”.",
        f"- **Controls.** With {draws}: for each feature and {words.symbol}, the same per-position push "
        "‖Δx_t‖ along a random unit direction (seeded, independent of the model; the mean over draws). "
        "*Specificity* is the feature's live KL over its controls' live KL.",
        "- **Dose.** Beside each value: the mean over live positions of ‖Δx_t‖ / ‖x_t‖ (the push relative to the "
        "residual there) and the push along the decoder direction in units of the feature's maximum activation "
        "on the corpus, so features and layers can be compared at equal push.",
        "- **What the uncertainty covers**: which documents of this corpus the passages came from. It does not "
        "cover the choice of features, the SAE's or model's training randomness, the live threshold, or text "
        "unlike this corpus; the verdicts are about these features on this kind of text.",
    ]
    if len(ctx):
        size = int(ctx.iloc[0])
        parts.append(f"- **Context.** The SAEs were trained on {size}-token contexts; positions $t \\ge {size}$ are "
                     "outside that range. Their share of the live positions, and the live means over $t < "
                     f"{size}$ alone, are in the table of tests.")
    return "\n".join(parts) + "\n"


def _count_by_alpha(rows: pd.DataFrame, flag: str) -> str:
    counts = rows.groupby("alpha")[flag].agg(["sum", "size"])
    return ", ".join(f"{a:g}: {int(r['sum'])} of {int(r['size'])}" for a, r in counts.iterrows())


def tests_fragment(inputs: ReportInputs) -> str:
    """The tests over the whole study, per value of the sweep, then the headline rows in a table."""
    pf = inputs.per_feature
    words = words_for(inputs.intervention)
    tests = pf[pf["p_adj_delta_ce_live"].notna()]
    if tests.empty:
        return "No row of this run has a test (no live position at any value other than the identity).\n"
    n_sig, n_untestable = int(tests["significant"].sum()), int((~tests["testable"].astype(bool)).sum())
    spec = pf[pf["p_adj_specific"].notna()]
    out = [f"Of the {len(tests)} tests of the loss change at live positions (layers × features × values of "
           f"{words.symbol} other than the identity), **{n_sig}** are distinguishable from zero after Holm's "
           f"adjustment (FWER {FWER:g}); {n_untestable} concern features that fire in too few documents to be "
           "testable at this sample size"
           + (f", and {len(tests) - n_sig - n_untestable} are not distinguishable from zero at this sample size. "
              if len(tests) - n_sig - n_untestable else ". ") +
           f"Distinguishable, by {words.symbol}: {_count_by_alpha(tests, 'significant')}."]
    if len(spec):
        out.append(f"Against the random-direction controls, **{int(spec['more_specific'].sum())}** of {len(spec)} "
                   "(feature, value) rows move the model more (live KL) than a random direction pushed as hard, after "
                   f"adjustment; by {words.symbol}: {_count_by_alpha(spec, 'more_specific')}.")
    ctx = pf["frac_live_beyond_ctx"].dropna()
    if len(ctx):
        out.append(f"Positions beyond the SAE's training context ({int(pf['sae_context_size'].dropna().iloc[0])} "
                   f"tokens) hold a median {pct(ctx.median())} of each feature's live positions (largest "
                   f"{pct(ctx.max())}).")
    return " ".join(out) + "\n\n" + tests_table(inputs) + "\n"


def _p(value) -> str:
    return "–" if not np.isfinite(value) else (f"{value:.1e}" if value < 1e-3 else f"{value:.3f}")


def _verdict(r: pd.Series) -> str:
    if not np.isfinite(r["p_adj_delta_ce_live"]):
        return '<span class="muted">no test</span>'
    if not bool(r["testable"]):
        return '<span class="muted">too rare to test</span>'
    return "<strong>distinguishable</strong>" if bool(r["significant"]) else "not distinguishable"


def tests_table(inputs: ReportInputs) -> str:
    head = inputs.headline
    words = words_for(inputs.intervention)
    cols = ["Layer", "Feature", "Docs (live)", "ΔCE live [95% CI]", "Holm p", "Verdict", "KL live",
            "Control KL live", "Specificity", "Holm p (spec.)", "‖Δx‖/‖x‖", "Push (× max act)", "Live beyond ctx",
            "ΔCE live, t < ctx"]
    lines = ['<table class="tests" data-quarto-disable-processing="true">',
             f"<caption>Each feature {h(words.applied(inputs.alpha))}: tests and controls</caption>",
             "<thead><tr>" + "".join(f"<th>{h(c)}</th>" for c in cols) + "</tr></thead>", "<tbody>"]
    for _, r in head.iterrows():
        ci = f"{num(r['delta_ce_live'])} [{num(r['delta_ce_live_lo'], 2)}, {num(r['delta_ce_live_hi'], 2)}]"
        spec = "more specific" if bool(r["more_specific"]) else ""
        cells = [str(int(r["layer"])), str(int(r["feature"])), f"{int(r['n_docs_live'])} of {int(r['n_docs'])}", ci,
                 _p(r["p_adj_delta_ce_live"]), _verdict(r), num(r["kl_live"]), num(r["ctrl_kl_live"]),
                 (num(r["specificity"], 2) + (f" <em>{spec}</em>" if spec else "")) if np.isfinite(r["specificity"]) else "–",
                 _p(r["p_adj_specific"]), num(r["dose_rel_norm"], 2), num(r["push_max_act"], 2),
                 pct(r["frac_live_beyond_ctx"]) if np.isfinite(r["frac_live_beyond_ctx"]) else "–",
                 num(r["delta_ce_live_in_ctx"])]
        lines.append("<tr>" + "".join(f'<td class="num">{c if "<" in c else h(c)}</td>' for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return raw_html("\n".join(lines))
