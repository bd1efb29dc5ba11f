"""The report's screen section: every feature's estimated effect, how far the estimate holds, and where the
study's features rank.

Read from metrics/screen/ (stage `screen`, docs/screen.md) and data/features.csv. Per layer: a figure of the
estimated effect over the whole dictionary at the headline alpha with the chosen features marked, beside the
estimate against the exact delta_ce of the verified features at every alpha; then the agreement figures per
(layer, alpha), where each chosen feature ranks, and each layer's top features with labels and links. Every
sentence quotes a number from these files.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

from pipeline.core import artifacts
from pipeline.core.columns import SCREEN_ESTIMATES
from pipeline.report.inputs import ReportInputs
from pipeline.report.text import h, integer, num, one_line, pct, raw_html

TOP_SHOWN = 5  # top features per layer in the table


def feature_ranks(tables: dict[int, pd.DataFrame], chosen: pd.DataFrame) -> pd.DataFrame:
    """Where each chosen (layer, feature) ranks in its layer's screen: `rank` by |estimate| among all features,
    `rank_per_firing` by the density-free reading among the firing ones (0: it never fires on the corpus)."""
    rows = []
    for row in chosen.itertuples(index=False):
        table = tables[int(row.layer)]
        screen_row = table.iloc[int(row.feature)]
        rows.append({"layer": int(row.layer), "feature": int(row.feature), "label": row.label,
                     "rank": int(screen_row["rank"]), "n_features": len(table),
                     "rank_per_firing": int(screen_row["rank_per_firing"]),
                     "n_firing_features": int((table["n_firing"] > 0).sum()),
                     "est_delta_ce": float(screen_row["est_delta_ce"]), "density": float(screen_row["density"])})
    return pd.DataFrame(rows)


def _figure(table: pd.DataFrame, chosen: list[int], rows: pd.DataFrame, layer: int, alpha: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firing = table[table["n_firing"] > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 2.9))
    est = firing["est_delta_ce"].to_numpy()
    scale = max(np.abs(est).max(initial=0.0), 1e-12)
    left.hist(est, bins=60, range=(-scale, scale), color="0.6")
    left.set_yscale("log")
    for f in chosen:
        left.axvline(float(table.loc[f, "est_delta_ce"]), color="C3", lw=1)
    left.set(xlabel=f"estimated ΔCE at α = {alpha:g} (nats)", ylabel="features (log)",
             title=f"{len(firing)} firing features; red: the study's")
    for i, (a, g) in enumerate(rows.groupby("alpha", sort=True)):
        if a != 1.0:
            right.scatter(g["exact"], g["estimate"], s=8, color=f"C{i % 10}", label=f"α = {a:g}")
    lim = max(np.abs(rows[["exact", "estimate"]].to_numpy()).max(initial=0.0), 1e-12)
    right.plot([-lim, lim], [-lim, lim], color="0.3", lw=0.8, ls=":")
    right.set(xlabel="exact ΔCE (nats)", ylabel="estimate (nats)", title="verified features")
    right.legend(fontsize=7, frameon=False)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    caption = (f"The screen of layer {layer}: left, the estimated ΔCE at α = {alpha:g} of every feature that fires on the "
               "corpus (red lines: the features the study measures); right, estimate against the engine's exact ΔCE "
               "for the verified features at each α of the sweep (dotted: equality).")
    return raw_html(f'<figure class="gen-fig"><img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"'
                    f' alt="{h(caption)}">\n<figcaption>{h(caption)}</figcaption></figure>')


ESTIMATOR_WORDS = {column: name.replace("_", " ") for name, column in SCREEN_ESTIMATES.items()}


def _agreement_table(agreement: pd.DataFrame) -> str:
    lines = ["| layer | α | subset | estimate | features | Spearman [95%] | Pearson | same sign | top overlap |",
             "|---:|---:|---|---|---:|---|---:|---:|---:|"]
    for r in agreement.itertuples(index=False):
        lines.append(f"| {r.layer} | {r.alpha:g} | {r.subset} | {ESTIMATOR_WORDS[r.estimator]} | {r.n_features} | "
                     f"{num(r.spearman)} "
                     f"[{num(r.spearman_lo)}, {num(r.spearman_hi)}] | {num(r.pearson)} | {pct(r.sign_agreement, 0)} | "
                     f"{r.top_overlap} of {r.top_n} |")
    return "\n".join(lines) + "\n"


def _where_it_holds(agreement: pd.DataFrame) -> str:
    """The agreement near alpha = 1 and at the farthest alpha (sample subset), for each estimate verified."""
    said = [_where_one_holds(agreement, estimator) for estimator in ESTIMATOR_WORDS
            if (agreement["estimator"] == estimator).any()]
    return " ".join(said) if said else _where_one_holds(agreement, SCREEN_ESTIMATES["first_order"])


def _where_one_holds(agreement: pd.DataFrame, estimator: str) -> str:
    sample = agreement[(agreement["estimator"] == estimator) & (agreement["subset"] == "random")].dropna(
        subset=["spearman"])
    if sample.empty:
        return "No random sample was verified (screen_random is 0, or no feature fires), so no agreement is measured."
    distance = (sample["alpha"] - 1.0).abs()
    near, far = sample[distance == distance.min()], sample[distance == distance.max()]
    return (f"For the random sample, the Spearman correlation of the {ESTIMATOR_WORDS[estimator]} estimate and exact ΔCE is "
            f"{num(near['spearman'].min())} to {num(near['spearman'].max())} at α = "
            f"{', '.join(f'{a:g}' for a in sorted(near['alpha'].unique()))} (closest to 1) and "
            f"{num(far['spearman'].min())} to {num(far['spearman'].max())} at α = "
            f"{', '.join(f'{a:g}' for a in sorted(far['alpha'].unique()))} (farthest), over the layers; the share with "
            f"the exact sign is {pct(far['sign_agreement'].min(), 0)} at worst there. ")


def screen_fragment(inputs: ReportInputs) -> str:
    tables = {layer: artifacts.read_screen(layer) for layer in inputs.layers}
    verification = artifacts.read_screen_verification()
    agreement = artifacts.read_screen_agreement()
    alpha = float(next(iter(tables.values()))["alpha"].iloc[0])
    ranks = feature_ranks(tables, inputs.features)
    sources = sorted(inputs.features["source"].unique())
    parts = [
        "The screen estimates, for every feature of every studied layer, the `scale` intervention's all-position ΔCE "
        "to first order: the derivative of ΔCE in α at α = 1 (the clean model), computed for the whole dictionary "
        "from one forward and one backward pass over the corpus, times (α − 1). It is exact in the limit α → 1 and "
        "misses every curvature of the loss in α: how far from α = 1 it can be trusted is what the exact runs below "
        "measure. Per layer, the features with the largest estimate and a seeded random sample of firing features "
        "are then run exactly at every α of the sweep"
        + (", beside a second-order estimate that adds the curvature of the loss along each verified feature's push, "
           "(α − 1)²/2 · vᵀHv (one double backward per feature: too costly for the whole dictionary). "
           if (agreement["estimator"] == SCREEN_ESTIMATES["second_order"]).any() else ". ")
        + _where_it_holds(agreement)
        + f"All numbers: `{artifacts.SCREEN_DIR}/` (docs/screen.md).\n",
        "## Agreement of estimate and exact ΔCE\n",
        "Per layer and α (α = 1 left out: both are 0 there); *random* is the seeded sample of firing features (what a "
        "feature drawn from the dictionary looks like), *all* adds the top features. Top overlap: how many of the top "
        "features by |estimate| are among the top by |exact ΔCE| within the verified set.\n",
        _agreement_table(agreement),
        "## Where the study's features rank\n",
        f"The features measured in this study come from the `{', '.join(sources)}` source. Rank 1 is the largest "
        "|estimated effect| of the layer; the per-firing rank orders the firing features by their effect per firing "
        "position, which does not favour features for firing often.\n",
        "| layer | feature | label | rank | per-firing rank | estimate (nats) | density |",
        "|---:|---:|---|---|---|---:|---:|",
    ]
    for r in ranks.itertuples(index=False):
        per_firing = f"{r.rank_per_firing} of {r.n_firing_features}" if r.rank_per_firing else "never fires"
        parts.append(f"| {r.layer} | {r.feature} | {h(one_line(str(r.label)))[:60]} | {r.rank} of {integer(r.n_features)} "
                     f"| {per_firing} | {num(r.est_delta_ce)} | {pct(r.density, 2)} |")
    parts.append("\n## Per layer\n")
    labels = {(int(r.layer), int(r.feature)): str(r.label) for r in inputs.features.itertuples(index=False)}
    for layer, table in tables.items():
        chosen = inputs.features.loc[inputs.features["layer"] == layer, "feature"].astype(int).tolist()
        rows = verification[verification["layer"] == layer]
        parts.append(f"### Layer {layer}\n")
        parts.append(_figure(table, chosen, rows, layer, alpha))
        plan = inputs.model.layer(layer).plan()
        top = table.sort_values("rank").head(TOP_SHOWN)
        parts.append(f"\nThe {TOP_SHOWN} largest estimated effects of the layer ({integer(int((table['n_firing'] > 0).sum()))}"
                     f" of {integer(len(table))} features fire on the corpus); labels where the study measured the "
                     "feature, links where the SAE has a Neuronpedia source.\n")
        parts.append("| rank | feature | estimate (nats) | density | label | link |\n|---:|---:|---:|---:|---|---|")
        for r in top.itertuples(index=False):
            url = plan.neuronpedia_url(int(r.feature))
            link = f"[Neuronpedia]({url})" if url else "–"
            label = h(one_line(labels.get((layer, int(r.feature)), "–")))[:60]
            parts.append(f"| {r.rank} | {r.feature} | {num(r.est_delta_ce)} | {pct(r.density, 2)} | {label} | {link} |")
        parts.append("")
    return "\n".join(parts) + "\n"
