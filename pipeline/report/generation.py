"""The report's steered-generation section: what the model writes with a feature turned up.

Per layer, for the GEN_FEATURES_SHOWN features whose steering changed the text most, a table of prompt, clean continuation and the continuation at each value side by
side (sampled and greedy), each generated token shaded by the feature's activation there (the
clean model reading the text back), and a small figure of concept activation and fluency (the
clean model's loss on the text) against the value. Read from data/generations.json and
metrics/generation.csv (stage generate); the figure is embedded as a data URI.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.modes import MODES
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import h, num, one_line, raw_html, visible_html

GEN_FEATURES_SHOWN = 2  # features per layer with a table
PROMPTS_SHOWN = 2  # the feature's own context, then the first neutral prompt


def _load(inputs: ReportInputs) -> tuple[dict[str, Any], pd.DataFrame]:
    gens = artifacts.read_generations()
    table = artifacts.read_generation_metrics()
    have = [int(d["layer"]) for d in gens["layers"]]
    if sorted(have) != sorted(inputs.layers) or sorted(table["layer"].unique().tolist()) != sorted(inputs.layers):
        raise UserError(f"{artifacts.GENERATIONS} covers layers {have} but params `layers` is {list(inputs.layers)}; "
                        "it is stale: rerun `dvc repro generate`")
    return gens, table


def shown_features(table: pd.DataFrame, layer: int, n: int = GEN_FEATURES_SHOWN) -> list[int]:
    """The n features of a layer whose steering changed the most continuations (mean of frac_changed
    over values and decodings), then whose sampled concept activation rose most over the clean text
    at the largest value, then the lower index."""
    rows = table[table["layer"] == layer]
    changed = rows.groupby("feature")["frac_changed"].mean().fillna(0.0)
    top = rows[(rows["decoding"] == "sampled") & (rows["alpha"] == rows["alpha"].max())].set_index("feature")
    gain = (top["concept_act"] - top["concept_act_clean"]).fillna(-math.inf)
    order = sorted(changed.index, key=lambda f: (-changed[f], -gain.get(f, -math.inf), f))
    return [int(f) for f in order[:n]]


def _text_html(tokens: list[str], acts: list[float] | None, scale: float) -> str:
    """The generated tokens, each one where the feature fires shaded by its activation."""
    out = []
    for i, tok in enumerate(tokens):
        a = acts[i] if acts is not None else 0.0
        if a > 0 and scale > 0:
            alpha = 0.25 + 0.75 * min(1.0, a / scale)
            out.append(f'<mark style="background: rgba(255, 196, 0, {alpha:.2f})" title="{h(num(a))}">'
                       f"{visible_html(tok)}</mark>")
        else:
            out.append(visible_html(tok))
    return '<span class="gen">' + "".join(out) + "</span>"


def _feature_table(layer_gen: dict[str, Any], feature: int, alphas: list[float], label: str, symbol: str) -> str:
    rows = layer_gen["rows"]
    key = str(feature)
    info = next(f for f in layer_gen["features"] if int(f["feature"]) == feature)
    prompts = ([info["context_prompt"]] if info["context_prompt"] is not None else []) + [0]
    prompts = prompts[:PROMPTS_SHOWN]

    def find(prompt: int, alpha: float | None, decoding: str) -> dict[str, Any]:
        return next(r for r in rows if r["prompt"] == prompt and r["decoding"] == decoding
                    and (r["feature"] is None if alpha is None else (r["feature"] == feature and r["alpha"] == alpha)))

    acts_all = [a for r in rows if key in r["acts"] for a in r["acts"][key]]
    scale = max(acts_all, default=0.0)
    head = "".join(f"<th>{h(c)}</th>" for c in ["Prompt", "Clean", *(f"{symbol} = {a:g}" for a in alphas)])
    body = []
    for p in prompts:
        prompt_tokens = layer_gen["prompts"][p]["tokens"][1:]  # BOS left out
        kind = "top-activating context" if layer_gen["prompts"][p]["kind"] == "context" else "neutral prompt"
        for d in ("sampled", "greedy"):
            cells = [f'<td class="prompt"><span class="gen">{visible_html("".join(prompt_tokens))}</span>'
                     f'<br><span class="se">{h(kind)}, {h(d)}</span></td>']
            for a in [None, *alphas]:
                r = find(p, a, d)
                cells.append(f"<td>{_text_html(r['tokens'], r['acts'].get(key), scale)}"
                             f'<br><span class="se">loss {h(num(r["loss"]))}</span></td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"Layer {layer_gen['layer']}, feature {feature}" + (f": {one_line(label)}" if label else "")
    return raw_html(f'<table class="generations" data-quarto-disable-processing="true">\n<caption>{h(caption)}'
                    f"</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>")


def _figure(table: pd.DataFrame, layer: int, symbol: str, labels: dict[int, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[(table["layer"] == layer) & (table["decoding"] == "sampled")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 2.8))
    for i, (feature, g) in enumerate(rows.groupby("feature", sort=True)):
        color = f"C{i % 10}"
        g = g.sort_values("alpha")
        name = f"{int(feature)} {labels.get(int(feature), '')}"[:28]
        left.plot(g["alpha"], g["concept_act"], "o-", color=color, ms=3, label=name)
        left.axhline(g["concept_act_clean"].iloc[0], color=color, ls=":", lw=1)
        right.plot(g["alpha"], g["loss"], "o-", color=color, ms=3)
        right.axhline(g["loss_clean"].iloc[0], color=color, ls=":", lw=1)
    left.set(xlabel=symbol, ylabel="feature activation in the text", title="does the concept appear?")
    right.set(xlabel=symbol, ylabel="clean model's loss (nats/token)", title="does the text stay fluent?")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    left.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    caption = (f"Layer {layer}: sampled continuations, mean over prompts, per feature (dotted: the clean model's "
               f"continuations of the same prompts).")
    return raw_html(f'<figure class="gen-fig"><img src="data:image/png;base64,{data}" alt="{h(caption)}">\n'
                    f"<figcaption>{h(caption)}</figcaption></figure>")


def generation_fragment(inputs: ReportInputs) -> str:
    gens, table = _load(inputs)
    symbol = MODES[gens["intervention"]].symbol
    alphas = [float(a) for a in gens["alphas"]]
    labels = {(int(r["layer"]), int(r["feature"])): (r["label"] if isinstance(r["label"], str) else "")
              for _, r in inputs.features.iterrows()}
    parts = [
        f"Each feature is turned up inside the model while it writes: every prompt is continued for "
        f"{gens['generate_tokens']} tokens with the {h(gens['intervention'])} intervention at every position but BOS "
        f"({symbol} ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}), greedily and by sampling at temperature "
        f"{gens['temperature']:g} (seed {gens['seed']}; the clean model's continuation of the same prompt uses the same "
        f"random numbers). Shading marks the generated tokens where the feature fires, darker for a stronger activation, "
        f"as the clean model reads the text back; below each text, the clean model's mean loss on it. The figures show, "
        f"for every feature of a layer, the feature's mean activation in the sampled text and the clean model's loss on "
        f"it against {symbol}: the steering works where the first rises while the second stays near the clean text's. "
        f"All numbers: `{artifacts.GENERATION_METRICS}`; every text: `{artifacts.GENERATIONS}`.\n",
    ]
    for layer_gen in sorted(gens["layers"], key=lambda d: d["layer"]):
        layer = int(layer_gen["layer"])
        layer_labels = {f: lab for (lay, f), lab in labels.items() if lay == layer}
        parts.append(_figure(table, layer, symbol, layer_labels))
        for feature in shown_features(table, layer):
            parts.append(_feature_table(layer_gen, feature, alphas, layer_labels.get(feature, ""), symbol))
    return "\n".join(parts)
