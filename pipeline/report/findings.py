"""What the report concludes: the sanity checks (as `aggregate` computed them, worded here) and the short
"what the numbers mean and what they do not" paragraph.

Nothing here is boilerplate: each sentence is chosen and filled from the headline rows, the
sweep and the run records, so a toy run with random weights, a trained toy and GPT-2 Small each
get the paragraph their numbers support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.modes import MODES
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import md, num, pct, tex_num
from pipeline.stats.study import test_counts


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not applicable to this run
    detail: str  # markdown


def identity_check(identity: dict[str, Any], intervention: str) -> Check:
    name = "Identity: the unchanged model gives zero effect"
    if identity.get("alpha") is None:
        return Check(name, None, f"The `{intervention}` intervention has no value that leaves the model "
                                 "unchanged, so there is nothing to check.")
    symbol = MODES[intervention].symbol
    if not identity.get("rows"):
        return Check(name, None, f"{symbol} = {identity['alpha']:g} is not in this run's sweep, so it was not "
                                 "measured.")
    rows, nonzero = identity["rows"], identity["rows_nonzero"]
    detail = (f"At {symbol} = {identity['alpha']:g}, {rows - nonzero} of {rows} rows have ΔCE = 0 and KL = 0 exactly "
              f"(all tokens and live tokens); largest |ΔCE| {num(identity['max_abs_delta_ce'])}, "
              f"largest KL {num(identity['max_kl'])}.")
    return Check(name, nonzero == 0, detail)


def kl_check(kl: dict[str, Any]) -> Check:
    detail = (f"KL cannot be negative; float rounding may leave an exact zero slightly below it. Smallest KL "
              f"(all and live tokens, {kl['values']} values): {num(kl['min']) if kl['values'] else '–'}; "
              f"{kl['below_tolerance']} below the tolerance ${tex_num(-kl['tolerance'])}$.")
    return Check("KL ≥ 0 (within tolerance)", kl["below_tolerance"] == 0, detail)


def nan_check(nan: dict[str, Any]) -> Check:
    n_bad = nan["unexpected"]
    detail = (f"{n_bad} non-finite values among {nan['measurements']:,} measurements ({nan['columns']} metric columns "
              f"× {nan['rows']} rows).")
    if nan["first"]:
        f = nan["first"]
        detail += f" First: `{f['column']}` at layer {f['layer']}, feature {f['feature']}, α = {f['alpha']:g}."
    if nan["no_live_rows"]:
        detail += (f" {nan['no_live_rows']} rows have no live position, so their live-token means are NaN by "
                   "definition (never 0); those are not counted.")
    detail += (" Intervals, tests and control columns are NaN, by definition, where they are undefined (too few "
               "documents, no live position, controls off).")
    return Check("No NaN or infinite metric", n_bad == 0, detail)


def clean_ce_check(clean: dict[str, Any]) -> Check:
    detail = (f"Every row measures against the same clean model and tokens, so clean CE must agree across "
              f"layers and features: {num(clean['mean'], 6)} nats, spread {num(clean['spread'])}.")
    return Check("Clean cross-entropy is the same in every row", clean["same"], detail)


def sanity_checks(inputs: ReportInputs) -> list[Check]:
    """The checks aggregate computed (metrics/summary_details.json's `sanity`), worded."""
    checks = inputs.summary_details["sanity"]
    return [identity_check(checks["identity"], inputs.intervention), kl_check(checks["kl"]),
            nan_check(checks["nan"]), clean_ce_check(checks["clean_ce"])]


def _toy_weights(inputs: ReportInputs) -> str | None:
    toy = inputs.runs.get("model", {}).get("toy")
    return str(toy.get("weights")) if isinstance(toy, dict) and toy.get("weights") else None


def _interval(row: pd.Series) -> str:
    lo, hi = row["delta_ce_live_lo"], row["delta_ce_live_hi"]
    return f" [{num(lo, 2)}, {num(hi, 2)}]" if np.isfinite(lo) and np.isfinite(hi) else " (too few documents for an interval)"


def reading_paragraph(inputs: ReportInputs) -> str:
    """One paragraph, markdown, every clause backed by a number from this run (effects where features fire
    first; a claim of an effect only where the study-wide adjusted test supports it)."""
    head = inputs.headline
    a = inputs.alpha
    words = MODES[inputs.intervention]
    ce_clean = float(head["ce_clean"].mean())
    n_passages = int(head["n_passages"].iloc[0])
    out: list[str] = []
    live = head[head["delta_ce_live"].notna()]
    if len(live):
        by_layer = live.groupby("layer")["delta_ce_live"].mean()
        top_layer = int(by_layer.abs().idxmax())
        top = live.loc[live["delta_ce_live"].abs().idxmax()]
        picked = (f"the largest single live effect (picked as the largest |ΔCE| of {len(live)}, so its interval, "
                  "which does not account for that choice, is optimistic)")
        out.append(
            f"With each feature {words.applied(a)}, measured where it fires (its live positions), layer {top_layer}'s "
            f"features have the largest mean change of the loss ({num(by_layer[top_layer])} nats per live position; "
            f"a description of these features, not a tested ranking of layers); {picked}, layer {int(top['layer'])} "
            f"feature {int(top['feature'])}, is {num(top['delta_ce_live'])} nats{_interval(top)}, "
            f"{pct(abs(top['delta_ce_live']) / ce_clean, 2)} of the clean {num(ce_clean)} nats. Averaged over all "
            f"tokens, where most positions are untouched, the same layer's mean is {num(head[head['layer'] == top_layer]['delta_ce'].mean())} nats.")

    c = test_counts(inputs.per_feature)
    if c["tests"]:
        rest = (f", and {c['not_shown']} are not shown to move it one way at this sample size, which is not evidence "
                "of no effect" if c["not_shown"] else "")
        out.append(f"Across the study's {c['tests']} tests (every layer, feature and {words.symbol} other than the "
                   f"identity, sign-flip by document, Holm-adjusted), {c['significant']} move the loss one way "
                   f"where the feature fires; {c['too_rare']} fire in too few documents for any outcome to pass{rest} "
                   f"({n_passages} passages from {int(head['n_docs'].iloc[0])} documents).")
    versus = inputs.per_feature[inputs.per_feature["p_adj_vs_random"].notna()]
    if len(versus):
        more, less = int(versus["more_than_random"].sum()), int(versus["less_than_random"].sum())
        alphas = sorted({float(x) for x in versus.loc[versus["more_than_random"].astype(bool), "alpha"]})
        where = f" (at {words.symbol} = {', '.join(f'{x:g}' for x in alphas)})" if alphas else ""
        out.append(f"Against random directions pushed exactly as hard at the same positions, {more} of {len(versus)} "
                   f"(feature, value) rows move the model more than a random direction would{where} and {less} less, "
                   f"after adjustment; at {words.symbol} = {a:g} the median feature disturbs the model "
                   f"{num(head['kl_ratio_random'].median(), 2)}× as much as the random directions (live KL over "
                   "their geometric mean).")

    ratio = (head["kl_live"] / head["kl"]).replace([np.inf, -np.inf], np.nan).dropna()
    if len(ratio):
        if words.acts_where_silent:
            out.append(
                f"Live-token KL is a median {num(ratio.median(), 2)}× the all-token KL. The {words.name} intervention "
                "changes the residual at every position, live or not, so this gap says where the push matters "
                f"more, not where it is applied (the feature is live on a median {pct(head['frac_live'].median())} "
                "of positions).")
        else:
            out.append(
                f"Live-token KL is a median {num(ratio.median(), 2)}× the all-token KL, largely by construction: the "
                f"feature is live on a median {pct(head['frac_live'].median())} of positions, and where its "
                "activation is zero, scaling it leaves the residual unchanged.")
    beyond = head["frac_live_beyond_ctx"].dropna()
    if len(beyond) and beyond.max() > 0:
        out.append(f"A median {pct(beyond.median())} of live positions lie beyond the SAEs' "
                   f"{int(head['sae_context_size'].dropna().iloc[0])}-token training context, where the SAEs were "
                   "never trained; the table of tests gives the live ΔCE over the positions inside it.")

    sweep = inputs.per_feature.groupby("alpha")["kl_live"].mean()
    centre = words.identity if words.identity is not None else min(sweep.index)
    below = sorted((x for x in sweep.index if x < centre), reverse=True)
    above = sorted(x for x in sweep.index if x > centre)
    if len(below) + len(above) >= 2:
        steady = all((np.diff([sweep[x] for x in side]) >= 0).all() for side in (below, above) if len(side) > 1)
        ends = (f"{num(sweep[min(sweep.index)])} nats at {words.symbol} = {min(sweep.index):g}, "
                f"{num(sweep[max(sweep.index)])} at {words.symbol} = {max(sweep.index):g}")
        out.append(f"Mean live KL {'grows' if steady else 'does not grow steadily'} as {words.symbol} moves away from "
                   f"{centre:g} ({ends})"
                   + ("." if steady else "; check the sweep figure before trusting the curves."))

    sources = ", ".join(sorted(set(inputs.features["source"].dropna().astype(str)))) or "unknown"
    out.append(f"Layers differ in which features were chosen ({md(sources)} selection), so a trend across layers "
               f"is a correlation between depth and these particular features, not evidence that depth causes it.")

    m = inputs.model.model
    if inputs.is_toy:
        weights = _toy_weights(inputs)
        what = f"a {m.n_layers}-layer, d_model {m.d_model} stand-in" + (
            f" with {md(weights)} weights" if weights else "")
        text = f"Finally, this is the toy preset ({what}): its numbers test the pipeline and say nothing about GPT-2 Small"
        if weights == "random":
            text += ", and with random weights its token lists show no learned structure."
        else:
            text += (". Its passages come from the same Python documentation the toy was trained on (all but a "
                     "held-out tail), so they measure the features on familiar text, not on new text.")
        out.append(text)
    else:
        out.append(f"Finally, the numbers describe these {len(head)} features of {md(m.name)} on {n_passages} "
                   f"passages of {md(inputs.tokens.get('corpus', 'the corpus'))}, not SAE features in general.")
    return " ".join(out)
