"""Stage `plot`: figures (PNG) and the data behind them (CSV, declared as DVC plots).

- plots/layer_vs_dloss_alpha<alpha>.png: delta-CE per layer at the headline alpha, each feature a
  point with its per-passage standard error, the layer mean as a line (data: plots/layer_dce.csv);
- plots/dce_vs_alpha.png and plots/kl_vs_alpha.png: the sweep, mean over features per layer
  (data: plots/alpha_sweep.csv);
- plots/kl_heatmap.png: KL at the headline alpha, layer x feature (data: plots/kl_heatmap.csv).
Only plot settings and the metrics tables are read: changing a plot setting re-runs no forward pass.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import artifacts  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io import atomic_path, write_csv  # noqa: E402
from pipeline.runinfo import stage_record  # noqa: E402
from pipeline.stage_params import StageParams  # noqa: E402

# The params this stage reads (its dvc.yaml params; tests/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "plot_dpi")


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        # Fixed metadata: the same data gives the same bytes.
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
    plt.close(fig)


def _style() -> None:
    plt.rcParams.update({
        "figure.figsize": (7.5, 4.2), "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.3, "font.size": 10, "svg.hashsalt": "fixed",
    })


def layer_dce_figure(per_feature: pd.DataFrame, alpha: float, dpi: int) -> pd.DataFrame:
    head = per_feature[per_feature["alpha"] == alpha].sort_values(["layer", "feature"])
    data = head[["layer", "feature", "label", "delta_ce", "delta_ce_se", "kl", "kl_se"]].copy()
    fig, ax = plt.subplots()
    layers = sorted(head["layer"].unique())
    for layer in layers:
        g = head[head["layer"] == layer]
        jitter = np.linspace(-0.18, 0.18, len(g)) if len(g) > 1 else np.zeros(1)
        ax.errorbar(layer + jitter, g["delta_ce"], yerr=g["delta_ce_se"].fillna(0), fmt="o", ms=4,
                    color="tab:blue", alpha=0.75, elinewidth=1, capsize=2)
    means = head.groupby("layer")["delta_ce"].mean()
    ax.plot(means.index, means.values, color="tab:red", lw=1.8, label="mean over features")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("Δ cross-entropy (nats)")
    ax.set_title(f"Effect of scaling each feature by α = {alpha:g} (points: features, bars: ±1 SE over passages)")
    ax.set_xticks(layers)
    ax.legend(loc="best")
    _save(fig, artifacts.headline_png(alpha), dpi)
    return data


def sweep_figures(per_feature: pd.DataFrame, dpi: int) -> pd.DataFrame:
    sweep = (per_feature.groupby(["layer", "alpha"])[["delta_ce", "kl"]].mean().reset_index()
             .sort_values(["layer", "alpha"]))
    cmap = plt.get_cmap("viridis")
    layers = sorted(sweep["layer"].unique())
    for metric, path, label in (("delta_ce", artifacts.DCE_VS_ALPHA_PNG, "Δ cross-entropy (nats)"),
                                ("kl", artifacts.KL_VS_ALPHA_PNG, "KL(clean ‖ intervened) (nats)")):
        fig, ax = plt.subplots()
        for i, layer in enumerate(layers):
            g = sweep[sweep["layer"] == layer]
            ax.plot(g["alpha"], g[metric], marker="o", ms=3, color=cmap(i / max(1, len(layers) - 1)),
                    label=f"layer {layer}")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("α (feature scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} against α, mean over features")
        ax.legend(ncol=2, fontsize=7, loc="best")
        _save(fig, path, dpi)
    return sweep


def kl_heatmap(per_feature: pd.DataFrame, alpha: float, dpi: int) -> pd.DataFrame:
    head = per_feature[per_feature["alpha"] == alpha].sort_values(["layer", "feature"]).copy()
    head["rank"] = head.groupby("layer").cumcount()
    grid = head.pivot(index="layer", columns="rank", values="kl")
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(grid) + 1.6))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(grid)), [str(x) for x in grid.index])
    ax.set_xticks(range(grid.shape[1]), [f"#{c + 1}" for c in grid.columns])
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        feat = head[(head["layer"] == grid.index[i]) & (head["rank"] == grid.columns[j])]["feature"]
        if len(feat):
            ax.text(j, i, f"{int(feat.iloc[0])}\n{v:.2g}", ha="center", va="center", fontsize=6.5,
                    color="white" if v > np.nanmax(grid.to_numpy()) / 2 else "black")
    ax.set_xlabel("features of the layer, by index (cell: feature index and KL)")
    ax.set_ylabel("layer")
    ax.set_title(f"KL(clean ‖ intervened) at α = {alpha:g}")
    fig.colorbar(im, ax=ax, label="nats")
    _save(fig, artifacts.KL_HEATMAP_PNG, dpi)
    return head[["layer", "rank", "feature", "kl"]]


def run_plot_stage(config: Config | StageParams) -> list[Path]:
    config = StageParams.of(config, "plot", PARAMS)
    per_feature = artifacts.read_per_feature()
    if not (per_feature["alpha"] == config.alpha).any():
        raise UserError(f"{artifacts.PER_FEATURE} has no rows at alpha {config.alpha:g}; rerun `dvc repro`")
    _style()
    with stage_record("plot"):
        artifacts.PLOTS.mkdir(exist_ok=True)
        for stale in artifacts.PLOTS.glob("layer_vs_dloss_alpha*.png"):
            if stale != artifacts.headline_png(config.alpha):
                stale.unlink()
        write_csv(artifacts.LAYER_DCE_CSV, layer_dce_figure(per_feature, config.alpha, config.plot_dpi))
        write_csv(artifacts.ALPHA_SWEEP_CSV, sweep_figures(per_feature, config.plot_dpi))
        write_csv(artifacts.KL_HEATMAP_CSV, kl_heatmap(per_feature, config.alpha, config.plot_dpi))
    return [artifacts.headline_png(config.alpha), artifacts.DCE_VS_ALPHA_PNG, artifacts.KL_VS_ALPHA_PNG, artifacts.KL_HEATMAP_PNG]
