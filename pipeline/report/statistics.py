"""The report's statistics: the intervention and uncertainty method as this run used them, and the
study-wide tests (does the loss move one way where the feature fires; does the feature's direction move the
model unlike a random one; docs/statistics.md), every sentence filled from metrics/per_feature_metrics.csv and worded for the chosen
intervention (pipeline.core.modes)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.modes import MODES
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import h, num, pct, raw_html
from pipeline.stats.random_directions import required_spreads
from pipeline.stats.resampling import EXACT_MAX_DOCS, FWER, MIN_INTERVAL_DOCS, N_BOOT, N_FAMILIES, N_FLIPS
from pipeline.stats.study import test_counts


def intervention_fragment(inputs: ReportInputs) -> str:
    mode = MODES[inputs.intervention]
    return (f"At the hook $h$ = `{inputs.model.hook}` of layer $L$, let $x_t$ be the residual stream at position $t$, "
            "$a_i(x_t)$ the activation of SAE feature $i$ computed by the SAE's encoder, and $W_\\text{dec}[i]$ the "
            f"feature's decoder direction. The `{inputs.intervention}` intervention replaces the residual stream at "
            "every position except the first (which holds BOS):\n\n"
            f"$$\n{mode.formula_tex}, \\qquad t \\ge 1 .\n$$\n\n{mode.meaning} The rest of the forward pass runs unchanged from the "
            "edited residual stream; each layer is intervened on by itself.\n")


def statistics_method_fragment(inputs: ReportInputs) -> str:
    pf = inputs.per_feature
    words = MODES[inputs.intervention]
    n_docs = int(pf["n_docs"].iloc[0])
    n_passages = int(pf["n_passages"].iloc[0])
    draws = int(pf["ctrl_draws"].max()) if "ctrl_draws" in pf and pf["ctrl_draws"].notna().any() else 0
    ctx = pf["sae_context_size"].dropna()
    parts = [
        f"- **Unit of resampling: the document.** The {n_passages} passages come from {n_docs} documents of the "
        "corpus (passages cut from one article are not independent). Each metric is the ratio of document sums; "
        "its 95% interval is a symmetric studentized (bootstrap-t) interval over the documents where the metric has "
        f"positions ({N_BOOT:,} resamples of them). It is shown only from {MIN_INTERVAL_DOCS} such documents up: "
        "below that, a simulation of this interval (in the tests) covers the true value too rarely, and the "
        "interval is left blank.",
        "- **Tests of the loss change.** For each (layer, feature, value other than the identity), a two-sided "
        "sign-flip test by document whose null hypothesis is that each document's summed ΔCE over live positions "
        "is *symmetric about zero* (as likely to lower the loss as to raise it, by the same amounts). It is exact "
        f"under that null whatever the shape of the effects (every sign vector up to {EXACT_MAX_DOCS} documents, "
        f"else {N_FLIPS:,} random ones). It is not a test that the mean change is zero: a change that averages zero "
        "but is skewed can be rejected; the interval is the statement about the mean. A rejection reads *moves the "
        "loss one way*. With k ≤ "
        f"{EXACT_MAX_DOCS} documents the test cannot give p below 2 / 2^k; with more, the random sign vectors "
        f"cannot give p below 1 / {N_FLIPS + 1:,}. The p-values are adjusted with **Holm's** method across the "
        f"whole study (family-wise error rate {FWER:g}). A row is *too rare to test* only if no outcome of its own "
        "test could pass Holm (its smallest possible p, with every other p as observed); otherwise an unrejected "
        "row is *not shown to move the loss one way* at this sample size, which is not evidence of no effect.",
        random_directions_method(words.symbol, draws, pf),
        f"- **Two families.** The loss tests and the random-direction comparisons are each held to {FWER:g}, so the "
        f"chance of any false verdict across both is up to {N_FAMILIES * FWER:g}.",
        "- **Dose.** Beside each value: the mean over live positions of ‖Δx_t‖ / ‖x_t‖ (the push relative to the "
        "residual there) and the push along the decoder direction in units of the feature's maximum activation "
        "on the corpus, so features and layers can be compared at equal push.",
        "- **What the uncertainty covers**: which documents of this corpus the passages came from, and, for the "
        "random-direction comparison, which random directions were drawn. It does not cover the choice of "
        "features, the SAE's or model's training randomness, the live threshold, or text unlike this corpus; the "
        "verdicts are about these features on this kind of text.",
    ]
    if len(ctx):
        size = int(ctx.iloc[0])
        parts.append(f"- **Context.** The SAEs were trained on {size}-token contexts; positions $t \\ge {size}$ are "
                     "outside that range. Their share of the live positions, and the live means over $t < "
                     f"{size}$ alone, are in the table of tests.")
    return "\n".join(parts) + "\n"


def random_directions_method(symbol: str, draws: int, pf: pd.DataFrame) -> str:
    if draws == 0:
        return "- **Random directions.** None in this run (`control_draws: 0`)."
    text = (f"- **Random directions.** For each feature and {symbol}, {draws} random unit directions (seeded, "
            "independent of the model) pushed exactly as hard as the feature at the same positions (‖Δx_t‖ per "
            "position). The null hypothesis is that the feature's direction is one more random direction: its "
            "live KL is compared with the draws' on the log scale, against the spread between the draws "
            f"(t with {draws - 1} degrees of freedom, a prediction test). *KL ratio to random* is the feature's "
            "live KL over the draws' geometric mean; it says how much more the model is disturbed, not how "
            "specific the effect is. The draws' range and the number of draws that moved the model at least as "
            "much are in the tables.")
    m = int(pf["p_vs_random"].notna().sum()) if "p_vs_random" in pf else 0
    if draws >= 2 and m:
        need = required_spreads(draws, m, FWER) * (1 + 1 / draws) ** 0.5
        text += (f" With {draws} draws and {m} comparisons, passing Holm's first threshold needs the feature's log "
                 f"live KL to lie {num(need, 3)} draw standard deviations from the draws' mean; more draws "
                 "(`control_draws`) lower that bar, each at the engine cost of the feature itself.")
    elif draws == 1:
        text += " One draw gives the ratio but no spread, so no test."
    return text


def _count_by_alpha(rows: pd.DataFrame, flag: str) -> str:
    counts = rows.groupby("alpha")[flag].agg(["sum", "size"])
    return ", ".join(f"{a:g}: {int(r['sum'])} of {int(r['size'])}" for a, r in counts.iterrows())


def tests_fragment(inputs: ReportInputs) -> str:
    """The tests over the whole study, per value of the sweep, then the headline rows in a table."""
    pf = inputs.per_feature
    words = MODES[inputs.intervention]
    tests = pf[pf["p_adj_delta_ce_live"].notna()]
    if tests.empty:
        return "No row of this run has a test (no live position at any value other than the identity).\n"
    c = test_counts(pf)
    versus = pf[pf["p_adj_vs_random"].notna()]
    out = [f"Of the {c['tests']} tests of the loss change at live positions (layers × features × values of "
           f"{words.symbol} other than the identity), **{c['significant']}** move the loss one way after Holm's "
           f"adjustment (FWER {FWER:g}), {c['too_rare']} concern features that fire in too few documents for any "
           f"outcome to pass, and {c['not_shown']} are not shown to move it one way at this sample size. "
           f"Moving the loss one way, by {words.symbol}: {_count_by_alpha(tests, 'significant')}."]
    if len(versus):
        more, less = int(versus["more_than_random"].sum()), int(versus["less_than_random"].sum())
        out.append(f"Against random directions pushed exactly as hard, **{more}** of {len(versus)} (feature, value) "
                   f"rows move the model (live KL) more than a random direction would, and {less} less, after "
                   f"adjustment (a second family at FWER {FWER:g}); more, by {words.symbol}: "
                   f"{_count_by_alpha(versus, 'more_than_random')}.")
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
    if bool(r["significant"]):
        return "<strong>moves the loss one way</strong>"
    if not bool(r["testable"]):
        return '<span class="muted">too rare to test</span>'
    return "not shown"


def _versus_random(r: pd.Series) -> str:
    if not np.isfinite(r["kl_ratio_random"]):
        return "–"
    verdict = " <em>more</em>" if bool(r["more_than_random"]) else (" <em>less</em>" if bool(r["less_than_random"])
                                                                      else "")
    return num(r["kl_ratio_random"], 2) + verdict


def tests_table(inputs: ReportInputs) -> str:
    head = inputs.headline
    words = MODES[inputs.intervention]
    cols = ["Layer", "Feature", "Docs (live)", "ΔCE live [95% CI]", "Holm p", "Verdict", "KL live",
            "Random KL live [range]", "KL ratio to random", "Holm p (vs random)", "‖Δx‖/‖x‖", "Push (× max act)",
            "Live beyond ctx", "ΔCE live, t < ctx"]
    lines = ['<table class="tests" data-quarto-disable-processing="true">',
             f"<caption>Each feature {h(words.applied(inputs.alpha))}: tests and controls</caption>",
             "<thead><tr>" + "".join(f"<th>{h(c)}</th>" for c in cols) + "</tr></thead>", "<tbody>"]
    for _, r in head.iterrows():
        ci = num(r["delta_ce_live"]) + (f" [{num(r['delta_ce_live_lo'], 2)}, {num(r['delta_ce_live_hi'], 2)}]"
                                        if np.isfinite(r["delta_ce_live_lo"]) else " [too few documents]")
        ctrl = (f"{num(r['ctrl_kl_live'])} [{num(r['ctrl_kl_live_min'], 2)}, {num(r['ctrl_kl_live_max'], 2)}]"
                if np.isfinite(r["ctrl_kl_live"]) else "–")
        cells = [str(int(r["layer"])), str(int(r["feature"])), f"{int(r['n_docs_live'])} of {int(r['n_docs'])}", ci,
                 _p(r["p_adj_delta_ce_live"]), _verdict(r), num(r["kl_live"]), ctrl, _versus_random(r),
                 _p(r["p_adj_vs_random"]), num(r["dose_rel_norm"], 2), num(r["push_max_act"], 2),
                 pct(r["frac_live_beyond_ctx"]) if np.isfinite(r["frac_live_beyond_ctx"]) else "–",
                 num(r["delta_ce_live_in_ctx"])]
        lines.append("<tr>" + "".join(f'<td class="num">{c if "<" in c else h(c)}</td>' for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return raw_html("\n".join(lines))
