"""What the report concludes, computed from the data: the sanity checks and the short
"what the numbers mean and what they do not" paragraph.

Nothing here is boilerplate: each sentence is chosen and filled from the headline rows, the
sweep and the run records, so a toy run with random weights, a trained toy and GPT-2 Small each
get the paragraph their numbers support.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.artifacts import KL_TOLERANCE
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import md, num, pct, tex_num

# Columns that hold measurements (not labels, token lists or links).
METRIC_COLUMNS = ("ce_clean", "ce_int", "delta_ce", "delta_ce_se", "kl", "kl_se", "delta_ce_live", "kl_live",
                  "n_live", "frac_live", "mean_act_live", "live_threshold", "density", "max_act")
NAN_WHEN_NO_LIVE = ("delta_ce_live", "kl_live", "mean_act_live")
NAN_WHEN_ONE_PASSAGE = ("delta_ce_se", "kl_se")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not applicable to this run
    detail: str  # markdown


def identity_check(per_feature: pd.DataFrame, identity: float | None, intervention: str) -> Check:
    name = "Identity: the unchanged model gives zero effect"
    if identity is None:
        return Check(name, None, f"The `{intervention}` intervention has no value that leaves the model "
                                 "unchanged, so there is nothing to check.")
    rows = per_feature[per_feature["alpha"] == identity]
    if rows.empty:
        return Check(name, None, f"α = {identity:g} is not in this run's sweep, so it was not measured.")
    effect = rows[["delta_ce", "kl", "delta_ce_live", "kl_live"]].abs()
    nonzero = int((effect.fillna(0) != 0).any(axis=1).sum())
    detail = (f"At α = {identity:g}, {len(rows) - nonzero} of {len(rows)} rows have ΔCE = 0 and KL = 0 exactly "
              f"(all tokens and live tokens); largest |ΔCE| {num(effect['delta_ce'].max())}, "
              f"largest KL {num(effect['kl'].max())}.")
    return Check(name, nonzero == 0, detail)


def kl_check(per_feature: pd.DataFrame) -> Check:
    values = pd.concat([per_feature["kl"], per_feature["kl_live"]]).dropna()
    below = int((values < -KL_TOLERANCE).sum())
    detail = (f"KL cannot be negative; float rounding may leave an exact zero slightly below it. Smallest KL "
              f"(all and live tokens, {len(values)} values): {num(values.min()) if len(values) else '–'}; "
              f"{below} below the tolerance ${tex_num(-KL_TOLERANCE)}$.")
    return Check("KL ≥ 0 (within tolerance)", below == 0, detail)


def nan_check(per_feature: pd.DataFrame) -> Check:
    cols = [c for c in METRIC_COLUMNS if c in per_feature.columns]
    values = per_feature[cols].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=float))
    allowed = np.zeros_like(bad)
    no_live = (per_feature["n_live"] == 0).to_numpy()
    one_passage = (per_feature["n_passages"] < 2).to_numpy()
    for j, col in enumerate(cols):
        if col in NAN_WHEN_NO_LIVE:
            allowed[:, j] = no_live
        elif col in NAN_WHEN_ONE_PASSAGE:
            allowed[:, j] = one_passage
    unexpected = bad & ~(allowed & np.isnan(values.to_numpy(dtype=float)))  # inf is never allowed
    n_bad = int(unexpected.sum())
    detail = (f"{n_bad} non-finite values among {bad.size:,} measurements ({len(cols)} metric columns × "
              f"{len(per_feature)} rows).")
    if n_bad:
        i, j = map(int, np.argwhere(unexpected)[0])
        row = per_feature.iloc[i]
        detail += f" First: `{cols[j]}` at layer {int(row['layer'])}, feature {int(row['feature'])}, α = {row['alpha']:g}."
    n_no_live = int(no_live.sum())
    if n_no_live:
        detail += (f" {n_no_live} rows have no live position, so their live-token means are NaN by definition "
                   "(never 0); those are not counted.")
    return Check("No NaN or infinite metric", n_bad == 0, detail)


def clean_ce_check(per_feature: pd.DataFrame) -> Check:
    spread = float(per_feature["ce_clean"].max() - per_feature["ce_clean"].min())
    ok = spread <= 1e-6 * max(1.0, abs(float(per_feature["ce_clean"].mean())))
    detail = (f"Every row measures against the same clean model and tokens, so clean CE must agree across "
              f"layers and features: {num(per_feature['ce_clean'].mean(), 6)} nats, spread {num(spread)}.")
    return Check("Clean cross-entropy is the same in every row", ok, detail)


def sanity_checks(inputs: ReportInputs) -> list[Check]:
    identity = inputs.summary.get("sanity", {}).get("identity_alpha")
    pf = inputs.per_feature
    return [identity_check(pf, identity, inputs.intervention), kl_check(pf), nan_check(pf), clean_ce_check(pf)]


def _toy_weights(inputs: ReportInputs) -> str | None:
    toy = inputs.runs.get("model", {}).get("toy")
    return str(toy.get("weights")) if isinstance(toy, dict) and toy.get("weights") else None


def _direction(x: float) -> str:
    return "raised" if x > 0 else "lowered"


def reading_paragraph(inputs: ReportInputs) -> str:
    """One paragraph, markdown, every clause backed by a number from this run."""
    head = inputs.headline
    a = inputs.alpha
    ce_clean = float(head["ce_clean"].mean())
    n_passages = int(head["n_passages"].iloc[0])
    by_layer = head.groupby("layer")["delta_ce"].mean()
    top_layer = int(by_layer.abs().idxmax())
    top = head.loc[head["delta_ce"].abs().idxmax()]
    out: list[str] = [
        f"At α = {a:g}, layer {top_layer}'s features moved the loss most on average (they "
        f"{_direction(by_layer[top_layer])} it by {num(abs(by_layer[top_layer]))} nats); the largest single effect, "
        f"layer {int(top['layer'])} feature {int(top['feature'])}, {_direction(top['delta_ce'])} it by "
        f"{num(abs(top['delta_ce']))} nats, {pct(abs(top['delta_ce']) / ce_clean, 2)} of the clean "
        f"{num(ce_clean)} nats."
    ]

    with_se = head[head["delta_ce_se"].notna() & (head["delta_ce_se"] > 0)]
    if len(with_se):
        n_sig = int((with_se["delta_ce"].abs() > 2 * with_se["delta_ce_se"]).sum())
        verdict = ("most are within noise" if n_sig < len(with_se) / 2 else "most stand clear of the noise")
        out.append(f"Only {n_sig} of {len(with_se)}" if n_sig < len(with_se) / 2 else f"{n_sig} of {len(with_se)}")
        out[-1] += (f" features move it by more than two standard errors over the {n_passages} passages, so {verdict}; "
                    f"those errors also assume the passages are independent draws.")

    ratio = (head["kl_live"] / head["kl"]).replace([np.inf, -np.inf], np.nan).dropna()
    if len(ratio):
        out.append(
            f"Live-token KL is a median {num(ratio.median(), 2)}× the all-token KL, by construction rather than as a "
            f"finding: the feature is live on a median {pct(head['frac_live'].median())} of positions, and where it "
            f"is zero the hook is left unchanged."
        )

    sweep = inputs.per_feature.groupby("alpha")["kl"].mean()
    below = sorted((x for x in sweep.index if x < 1.0), reverse=True)
    above = sorted(x for x in sweep.index if x > 1.0)
    if len(below) + len(above) >= 2:
        steady = all((np.diff([sweep[x] for x in side]) >= 0).all() for side in (below, above) if len(side) > 1)
        ends = f"{num(sweep[min(sweep.index)])} nats at α = {min(sweep.index):g}, {num(sweep[max(sweep.index)])} at α = {max(sweep.index):g}"
        out.append(f"Mean KL {'grows' if steady else 'does not grow steadily'} as α moves away from 1 ({ends})"
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
