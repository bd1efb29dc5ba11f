"""The generated fragments report/report.qmd includes, one markdown file per section part.

Prose is markdown; tables are raw HTML blocks (```{=html}) so every string from the data is
escaped exactly once and pandoc and Quarto pass them through unchanged. Figures are markdown
image references to copies of the plot stage's PNGs under report/generated/figures/, which both
renderers embed as data URIs. The run section lives in pipeline.report.run_section.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.modes import MODES
from pipeline.report.findings import reading_paragraph, sanity_checks
from pipeline.report.generation import generation_fragment
from pipeline.report.inputs import ReportInputs
from pipeline.report.run_section import lead_fragment, run_fragment
from pipeline.report.screen import screen_fragment
from pipeline.report.statistics import intervention_fragment, statistics_method_fragment, tests_fragment
from pipeline.report.text import (
    h,
    integer,
    is_number,
    num,
    one_line,
    pct,
    raw_html,
    token_html,
    token_list,
    visible_html,
)
from pipeline.stats.resampling import MIN_INTERVAL_DOCS

FIGURE_DIR = "figures"  # under report/generated/
TOKENS_SHOWN = 5  # promoted / suppressed tokens per feature in the table
SNIPPETS_PER_LAYER = 3
FIGURE_CAPTIONS = {
    "headline": "Δ cross-entropy at each feature's live positions when it is {applied}, per layer. Points: the "
                "features of each layer (filled: moves the loss one way, sign-flip test Holm-adjusted across the "
                "study), bars: 95% bootstrap-t interval from resampling the {docs} documents (none where the feature "
                "fires in fewer than {min_docs}), grey crosses: the same push along random directions (mean of the "
                "draws), line: mean over the layer's features.",
    "dce_vs_alpha": "Δ cross-entropy at live positions against {symbol}, mean over each layer's features; dotted: the "
                    "random-direction controls. {identity}",
    "kl_vs_alpha": "KL(clean ‖ intervened) at live positions against {symbol}, mean over each layer's features; "
                   "dotted: the random-direction controls.",
    "kl_heatmap": "Live KL with each feature {applied}, layer by layer (cell: feature index, live KL in nats, and × its "
                  "KL ratio to random directions: its live KL over the geometric mean of its random draws').",
}


def figure_fragment(inputs: ReportInputs, key: str) -> str:
    """A markdown figure: no `#fig-` id, so Quarto adds no numbering that pandoc would lack."""
    words = MODES[inputs.intervention]
    caption = FIGURE_CAPTIONS[key].format(applied=words.applied(inputs.alpha), symbol=words.symbol,
                                          identity=words.identity_note, docs=int(inputs.headline["n_docs"].iloc[0]),
                                          min_docs=MIN_INTERVAL_DOCS)
    where = artifacts.REPORT_GENERATED.relative_to(artifacts.REPORT_DIR).as_posix()  # relative to report.qmd
    return f"![{caption}]({where}/{FIGURE_DIR}/{inputs.figures[key].name})\n"


def method_fragment(inputs: ReportInputs) -> str:
    head = inputs.headline
    n, t = (int(x) for x in inputs.tokens["tokens_shape"])
    n_scored = int(head["n_scored"].iloc[0])
    zero_q = int((head["live_threshold"] == 0).sum())
    top_k = max((len(token_list(c)) for c in head["top_promoted"]), default=0)
    sweep = ", ".join(f"{a:g}" for a in inputs.alphas)
    scored = f"{n_scored:,}".replace(",", "{,}")  # TeX: a comma as a digit separator, not punctuation
    symbol = MODES[inputs.intervention].symbol_tex
    text = (f"In this run: $N = {n}$ passages of $T = {t}$ tokens, so each feature is scored on "
            f"$N(T-2) = {scored}$ positions; $P = {inputs.live_percentile:g}$; "
            f"${symbol} \\in \\{{{sweep}\\}}$ with headline ${symbol} = {inputs.alpha:g}$; the top {top_k} promoted "
            f"and suppressed tokens are kept per feature and value.")
    if zero_q:
        text += (f" For {zero_q} of {len(head)} features the {inputs.live_percentile:g}th percentile of the "
                 f"activation is 0 (they fire on fewer than {100 - inputs.live_percentile:g}% of positions), so their "
                 f"live positions are exactly the positions where they fire.")
    text += f" The median feature is live on {pct(head['frac_live'].median())} of scored positions."
    return text + "\n"


def _link(url: Any, text: str) -> str:
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return f'<a href="{h(url)}">{text}</a>'
    return text


def _tokens_cell(cell: Any, n: int = TOKENS_SHOWN) -> str:
    items = token_list(cell)[:n]
    if not items:
        return '<span class="list muted">none</span>'
    parts = []
    for tok, value in items:
        value_html = f' <span class="val">{h(num(value, 2))}</span>' if value is not None else ""
        parts.append(f'<span class="chip">{token_html(tok)}{value_html}</span>')
    return '<span class="list">' + " ".join(parts) + "</span>"


def _with_ci(value: Any, lo: Any, hi: Any, strong: bool = False) -> str:
    """The value, bold when `strong` (moves the loss one way after adjustment), its 95% interval below."""
    main = f"<strong>{h(num(value))}</strong>" if strong else h(num(value))
    ci = f'<br><span class="se">[{h(num(lo, 2))}, {h(num(hi, 2))}]</span>' if is_number(lo) and is_number(hi) else ""
    return main + ci


def _direct_cell(pairs: list[list[Any]] | None) -> str:
    """W_dec[i] @ W_U entries from data/detail ([token, id, value]) as a token list cell."""
    return _tokens_cell([[p[0], p[-1]] for p in (pairs or [])])


def _tokens_block(r: pd.Series, has_np: bool, direct: dict[str, Any] | None) -> str:
    lines = [f'<div class="toks"><span class="sign">+</span>{_tokens_cell(r["top_promoted"])}</div>',
             f'<div class="toks"><span class="sign">−</span>{_tokens_cell(r["top_suppressed"])}</div>']
    if direct:
        lines += [f'<div class="toks np"><span class="sign">W<sub>U</sub> +</span>{_direct_cell(direct.get("promoted"))}</div>',
                  f'<div class="toks np"><span class="sign">W<sub>U</sub> −</span>{_direct_cell(direct.get("suppressed"))}</div>']
    if has_np:
        lines += [f'<div class="toks np"><span class="sign">NP +</span>{_tokens_cell(r["np_pos_tokens"])}</div>',
                  f'<div class="toks np"><span class="sign">NP −</span>{_tokens_cell(r["np_neg_tokens"])}</div>']
    return "".join(lines)


def features_fragment(inputs: ReportInputs) -> str:
    head = inputs.headline
    has_np = bool(head["np_pos_tokens"].notna().any() or head["np_neg_tokens"].notna().any())
    columns = [("Layer", ""), ("Feature", "num"), ("Label", ""), ("Density", "num"), ("ΔCE live", "num"),
               ("KL live", "num"), ("ΔCE all", "num"), ("KL all", "num"), ("Live", "num"),
               (f"Top {TOKENS_SHOWN} tokens promoted (+) and suppressed (−)", "")]
    lines = ['<table class="features" data-quarto-disable-processing="true">',
             "<thead><tr>" + "".join(f'<th class="{c}">{h(name)}</th>' for name, c in columns) + "</tr></thead>",
             "<tbody>"]
    for layer, group in head.groupby("layer", sort=True):
        detail = {int(f["feature"]): f for f in inputs.details[int(layer)]["features"]}
        for i, (_, r) in enumerate(group.iterrows()):
            direct = detail.get(int(r["feature"]), {}).get("direct_logit_effect")
            cells = []
            if i == 0:
                cells.append(f'<th class="layer" rowspan="{len(group)}">{int(layer)}</th>')
            label = r["label"] if isinstance(r["label"], str) and r["label"].strip() else "(no label)"
            cells += [
                f'<td class="num">{_link(r["neuronpedia_url"], str(int(r["feature"])))}</td>',
                f'<td class="label">{_link(r["neuronpedia_url"], visible_html(one_line(label)))}</td>',
                f'<td class="num">{h(pct(r["density"], 2))}</td>',
                f'<td class="num">{_with_ci(r["delta_ce_live"], r["delta_ce_live_lo"], r["delta_ce_live_hi"], bool(r["significant"]))}</td>',
                f'<td class="num">{_with_ci(r["kl_live"], r["kl_live_lo"], r["kl_live_hi"])}</td>',
                f'<td class="num">{_with_ci(r["delta_ce"], r["delta_ce_lo"], r["delta_ce_hi"])}</td>',
                f'<td class="num">{_with_ci(r["kl"], r["kl_lo"], r["kl_hi"])}</td>',
                f'<td class="num">{h(integer(r["n_live"]))}<br><span class="se">{h(pct(r["frac_live"]))}</span></td>',
                f'<td class="tokens">{_tokens_block(r, has_np, direct)}</td>',
            ]
            lines.append(f'<tr class="{"first" if i == 0 else "rest"}">' + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    words = MODES[inputs.intervention]
    intro = (f"{len(head)} features in {head['layer'].nunique()} layers, each {words.applied(inputs.alpha)}. ΔCE and "
             f"KL are in nats, where the feature fires (live) and over all tokens, with the 95% interval from "
             f"resampling documents below (none from fewer than {MIN_INTERVAL_DOCS} documents); **bold** live ΔCE "
             f"moves the loss one way (sign-flip test, Holm-adjusted across the study). *Live* is the number (and share) of live positions. The tokens are ours: the largest "
             f"and smallest mean changes of the centred logits at live positions. Tokens are quoted; a shaded ↵ is a "
             f"newline, ⇥ a tab, \\xNN another invisible character.")
    intro += (" The W<sub>U</sub> rows are the feature's direct effect on the logits, its decoder direction times "
              "the unembedding (W<sub>dec</sub>[i] W<sub>U</sub>), from the same weights: what the feature writes, "
              "before the rest of the model reacts.")
    if has_np:
        intro += (" NP rows are Neuronpedia's own top positive and negative logits for the feature (the same "
                  "product, computed by Neuronpedia), for comparison.")
    if head["neuronpedia_url"].notna().any():
        intro += " Feature indices and labels link to the feature's Neuronpedia page."
    return intro + "\n\n" + raw_html("\n".join(lines))


def _predictions(top: list[list[Any]], actual: str) -> str:
    rows = []
    for item in top:
        tok, prob = str(item[0]), float(item[-1])
        mark = ' class="actual"' if tok == actual else ""
        rows.append(f"<li{mark}>{token_html(tok)} <span class=\"val\">{h(pct(prob))}</span></li>")
    return '<ol class="preds">' + "".join(rows) + "</ol>"


def _context(snippet: dict[str, Any]) -> str:
    tokens = [str(t) for t in snippet["tokens"]]
    i = int(snippet["fire_index"])
    before = visible_html("".join(tokens[:i]))
    fire = visible_html(tokens[i])
    nxt = visible_html(tokens[i + 1]) if i + 1 < len(tokens) else ""
    after = visible_html("".join(tokens[i + 2:]))
    return (f'<span class="ctx">{before}<mark>{fire}</mark><span class="next">{nxt}</span>'
            f'<span class="after">{after}</span></span>')


def _snippet_features(inputs: ReportInputs, layer: int) -> list[tuple[dict[str, Any], pd.Series]]:
    """The layer's SNIPPETS_PER_LAYER features with the largest live KL at the headline alpha."""
    rows = inputs.headline[inputs.headline["layer"] == layer].sort_values("kl_live", ascending=False, kind="stable")
    detail = {int(f["feature"]): f for f in inputs.details[layer]["features"]}
    return [(detail[int(r["feature"])], r) for _, r in rows.iterrows() if int(r["feature"]) in detail][:SNIPPETS_PER_LAYER]


def snippets_fragment(inputs: ReportInputs) -> str:
    words = MODES[inputs.intervention]
    parts = [f"For each layer, the {SNIPPETS_PER_LAYER} features with the largest live KL when "
             f"{words.applied(inputs.alpha)}, each at "
             f"its strongest firing in the corpus: the firing token is highlighted, the token that actually came next "
             f"is underlined, and the model's top next-token predictions there are listed clean and with the feature "
             f"{words.applied(inputs.alpha)} (the actual next token in bold). A shaded ↵ is a newline, ⇥ a tab.\n"]
    head = ["Feature", "Fires on", "Context", "Clean", f"{words.symbol} = {inputs.alpha:g}"]
    for layer in inputs.layers:
        detail = inputs.details[layer]
        rows = []
        for feat, r in _snippet_features(inputs, layer):
            snippets = feat.get("snippets") or []
            label = r["label"] if isinstance(r["label"], str) else ""
            feature_cell = (f'<td class="feat"><strong>{_link(feat.get("neuronpedia_url"), str(int(feat["feature"])))}'
                            f'</strong><br><span class="se">{visible_html(one_line(label))}</span></td>')
            if not snippets:
                rows.append(f"<tr>{feature_cell}<td colspan=\"4\" class=\"muted\">never fires on this corpus</td></tr>")
                continue
            s = snippets[0]
            fire = s["tokens"][int(s["fire_index"])]
            rows.append(f"<tr>{feature_cell}"
                        f'<td>{token_html(fire)}<br><span class="se">act {h(num(s["activation"]))}</span></td>'
                        f"<td>{_context(s)}</td><td>{_predictions(s['clean_top'], s['next_token'])}</td>"
                        f"<td>{_predictions(s['intervened_top'], s['next_token'])}</td></tr>")
        caption = f"Layer {layer} ({detail.get('hook', '')})"
        parts.append(raw_html(
            f'<table class="snippets" data-quarto-disable-processing="true">\n<caption>{h(caption)}</caption>\n'
            "<thead><tr>" + "".join(f"<th>{h(c)}</th>" for c in head) + "</tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>"))
    return "\n".join(parts)


def sanity_fragment(inputs: ReportInputs) -> str:
    lines = ["::: {.sanity}"]
    for check in sanity_checks(inputs):
        status = {True: "[✓ passed]{.pass}", False: "[✗ FAILED]{.fail}", None: "[– not applicable]{.na}"}[check.ok]
        lines.append(f"- {status} **{check.name}.** {check.detail}")
    lines.append(":::")
    return "\n".join(lines) + "\n"


def build_fragments(inputs: ReportInputs, rendered_by: str) -> dict[str, str]:
    """File name under report/generated/ -> markdown text."""
    return {
        "lead.md": lead_fragment(inputs),
        "run.md": run_fragment(inputs, rendered_by),
        "intervention.md": intervention_fragment(inputs),
        "method.md": method_fragment(inputs),
        "statistics.md": statistics_method_fragment(inputs),
        "tests.md": tests_fragment(inputs),
        "fig_headline.md": figure_fragment(inputs, "headline"),
        "fig_sweep.md": figure_fragment(inputs, "dce_vs_alpha") + "\n" + figure_fragment(inputs, "kl_vs_alpha"),
        "fig_heatmap.md": figure_fragment(inputs, "kl_heatmap"),
        "features.md": features_fragment(inputs),
        "snippets.md": snippets_fragment(inputs),
        "generation.md": generation_fragment(inputs),
        "screen.md": screen_fragment(inputs),
        "sanity.md": sanity_fragment(inputs),
        "reading.md": reading_paragraph(inputs) + "\n",
    }
