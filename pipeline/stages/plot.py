"""Stage `plot`: figures (PNG) and the data behind them (CSV, declared as DVC plots).

Every figure shows effects where the feature fires (its live positions); the all-token means are in
the CSVs beside them.
- plots/layer_vs_dloss_alpha<alpha>.png: live delta-CE per layer at the headline alpha, each feature a
  point with its 95% bootstrap-t interval by document (none below MIN_INTERVAL_DOCS documents; filled:
  the sign-flip test rejects "symmetric about 0" after Holm's adjustment), its random-direction controls'
  mean as a grey cross, the layer mean as a line
  (data: plots/layer_dce.csv);
- plots/dce_vs_alpha.png and plots/kl_vs_alpha.png: the sweep, live means over features per layer,
  the controls' dashed (data: plots/alpha_sweep.csv);
- plots/kl_heatmap.png: live KL at the headline alpha, layer x feature, with each feature's
  KL ratio to random directions (its live KL over the geometric mean of its controls') (data: plots/kl_heatmap.csv).
Axis labels and titles follow the intervention (pipeline.core.modes).
Only plot settings and the metrics tables are read: changing a plot setting re-runs no forward pass.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.core import artifacts  # noqa: E402
from pipeline.core.errors import UserError  # noqa: E402
from pipeline.core.io import atomic_path, write_csv  # noqa: E402
from pipeline.core.modes import MODES, Mode  # noqa: E402
from pipeline.core.params.config import Config  # noqa: E402
from pipeline.core.params.stage_params import StageParams  # noqa: E402
from pipeline.core.runinfo import stage_record  # noqa: E402
from pipeline.stats.resampling import MIN_INTERVAL_DOCS  # noqa: E402

# The params this stage reads (its dvc.yaml params; tests/contracts/test_stage_deps.py checks they agree).
PARAMS = ("alpha", "intervention", "plot_dpi")


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


LAYER_DCE_COLUMNS = ["layer", "feature", "label", "delta_ce_live", "delta_ce_live_lo", "delta_ce_live_hi",
                     "ctrl_delta_ce_live", "significant", "delta_ce", "delta_ce_se", "kl", "kl_se", "kl_live"]


def layer_dce_figure(per_feature: pd.DataFrame, alpha: float, dpi: int, words: Mode) -> pd.DataFrame:
    head = per_feature[per_feature["alpha"] == alpha].sort_values(["layer", "feature"])
    data = head[LAYER_DCE_COLUMNS].copy()
    fig, ax = plt.subplots()
    layers = sorted(head["layer"].unique())
    for layer in layers:
        g = head[head["layer"] == layer]
        x = layer + (np.linspace(-0.18, 0.18, len(g)) if len(g) > 1 else np.zeros(1))
        y = g["delta_ce_live"].to_numpy(dtype=float)
        err = np.vstack([y - g["delta_ce_live_lo"].to_numpy(dtype=float), g["delta_ce_live_hi"].to_numpy(dtype=float) - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err, nan=0.0), fmt="none", ecolor="tab:blue", alpha=0.6, elinewidth=1,
                    capsize=2)
        sig = g["significant"].fillna(False).astype(bool).to_numpy()
        ax.scatter(x[sig], y[sig], s=22, color="tab:blue", zorder=3)
        ax.scatter(x[~sig], y[~sig], s=22, facecolors="white", edgecolors="tab:blue", zorder=3)
        ax.scatter(x, g["ctrl_delta_ce_live"], s=18, marker="x", color="grey", zorder=2)
    means = head.groupby("layer")["delta_ce_live"].mean()
    ax.plot(means.index, means.values, color="tab:red", lw=1.8, label="mean over features")
    ax.scatter([], [], s=22, color="tab:blue", label="feature (filled: moves the loss one way, Holm p ≤ 0.05)")
    ax.scatter([], [], s=18, marker="x", color="grey", label="random directions (mean of the draws)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("Δ cross-entropy at live positions (nats)")
    ax.set_title(f"Each feature {words.applied(alpha)}: loss change where it fires (bars: 95% bootstrap-t interval "
                 f"by document, from {MIN_INTERVAL_DOCS} documents)",
                 fontsize=9)
    ax.set_xticks(layers)
    ax.legend(loc="best", fontsize=7)
    _save(fig, artifacts.headline_png(alpha), dpi)
    return data


def sweep_figures(per_feature: pd.DataFrame, dpi: int, words: Mode) -> pd.DataFrame:
    sweep = (per_feature.groupby(["layer", "alpha"])[["delta_ce_live", "kl_live", "ctrl_delta_ce_live", "ctrl_kl_live",
                                                      "delta_ce", "kl"]]
             .mean().reset_index().sort_values(["layer", "alpha"]))
    cmap = plt.get_cmap("viridis")
    layers = sorted(sweep["layer"].unique())
    for metric, path, label in (("delta_ce_live", artifacts.DCE_VS_ALPHA_PNG, "Δ cross-entropy at live positions (nats)"),
                                ("kl_live", artifacts.KL_VS_ALPHA_PNG, "KL(clean ‖ intervened) at live positions (nats)")):
        fig, ax = plt.subplots()
        for i, layer in enumerate(layers):
            g = sweep[sweep["layer"] == layer]
            colour = cmap(i / max(1, len(layers) - 1))
            ax.plot(g["alpha"], g[metric], marker="o", ms=3, color=colour, label=f"layer {layer}")
            ax.plot(g["alpha"], g[f"ctrl_{metric}"], ls=":", lw=1, color=colour)
        if words.identity is not None:
            ax.axvline(words.identity, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(words.axis)
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} against {words.symbol}, mean over features (dotted: random controls)",
                     fontsize=9)
        ax.legend(ncol=2, fontsize=7, loc="best")
        _save(fig, path, dpi)
    return sweep


def kl_heatmap(per_feature: pd.DataFrame, alpha: float, dpi: int, words: Mode) -> pd.DataFrame:
    head = per_feature[per_feature["alpha"] == alpha].sort_values(["layer", "feature"]).copy()
    head["rank"] = head.groupby("layer").cumcount()
    grid = head.pivot(index="layer", columns="rank", values="kl_live")
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(grid) + 1.6))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(grid)), [str(x) for x in grid.index])
    ax.set_xticks(range(grid.shape[1]), [f"#{c + 1}" for c in grid.columns])
    top = np.nanmax(grid.to_numpy()) if np.isfinite(grid.to_numpy()).any() else 0.0
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        cell = head[(head["layer"] == grid.index[i]) & (head["rank"] == grid.columns[j])]
        if len(cell):
            ratio = cell["kl_ratio_random"].iloc[0]
            spec_text = f"\n×{ratio:.2g}" if np.isfinite(ratio) else ""
            ax.text(j, i, f"{int(cell['feature'].iloc[0])}\n{v:.2g}{spec_text}", ha="center", va="center",
                    fontsize=6, color="white" if np.isfinite(v) and v > top / 2 else "black")
    ax.set_xlabel("features of the layer, by index (cell: feature, live KL, × random directions' live KL)")
    ax.set_ylabel("layer")
    ax.set_title(f"KL at live positions, each feature {words.applied(alpha)}", fontsize=9)
    fig.colorbar(im, ax=ax, label="nats")
    _save(fig, artifacts.KL_HEATMAP_PNG, dpi)
    return head[["layer", "rank", "feature", "kl_live", "ctrl_kl_live", "kl_ratio_random", "kl"]]


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
        words = MODES[config.intervention]
        write_csv(artifacts.LAYER_DCE_CSV, layer_dce_figure(per_feature, config.alpha, config.plot_dpi, words))
        write_csv(artifacts.ALPHA_SWEEP_CSV, sweep_figures(per_feature, config.plot_dpi, words))
        write_csv(artifacts.KL_HEATMAP_CSV, kl_heatmap(per_feature, config.alpha, config.plot_dpi, words))
    return [artifacts.headline_png(config.alpha), artifacts.DCE_VS_ALPHA_PNG, artifacts.KL_VS_ALPHA_PNG, artifacts.KL_HEATMAP_PNG]
