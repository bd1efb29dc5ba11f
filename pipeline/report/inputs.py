"""Everything the report reads, loaded once and checked for staleness.

The report reads only files earlier stages wrote (data/model.json, data/tokens.json,
data/features.csv, data/detail/, metrics/, plots/, data/runs/) plus the current params for the
headline alpha, the layers and the live percentile. A missing file is a one-line `UserError`
naming it and the stage that writes it; outputs that disagree with params (another alpha, other
layers) are refused as stale rather than reported under the wrong heading.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.core.params.config import Config
from pipeline.core.plan.record import ModelRecord

# The stages before the report whose run records (data/runs/<stage>.json) it reads, in pipeline order.
RUN_STAGES = ("model", "tokenize", "screen", "features", "intervene", "generate", "aggregate", "plot")

@dataclass(frozen=True)
class ReportInputs:
    alpha: float
    layers: tuple[int, ...]
    live_percentile: float
    model: ModelRecord  # data/model.json
    tokens: dict[str, Any]  # data/tokens.json
    features: pd.DataFrame  # data/features.csv, the studied layers only
    per_feature: pd.DataFrame  # metrics/per_feature_metrics.csv, every alpha
    summary: dict[str, Any]  # metrics/summary.json
    summary_details: dict[str, Any]  # metrics/summary_details.json: per layer, generation, sanity checks
    details: dict[int, dict[str, Any]]  # data/detail/layer_L.json
    runs: dict[str, dict[str, Any]]  # data/runs/<stage>.json, those that exist
    figures: dict[str, Path]  # "headline", "dce_vs_alpha", "kl_vs_alpha", "kl_heatmap" -> PNG

    @property
    def headline(self) -> pd.DataFrame:
        """The per-feature rows at the headline alpha, in layer then feature order."""
        rows = self.per_feature[self.per_feature["alpha"] == self.alpha]
        return rows.sort_values(["layer", "feature"], kind="stable").reset_index(drop=True)

    @property
    def alphas(self) -> list[float]:
        return sorted(float(a) for a in self.per_feature["alpha"].unique())

    @property
    def intervention(self) -> str:
        return str(self.per_feature["intervention"].iloc[0])

    @property
    def is_toy(self) -> bool:
        return self.model.preset == "toy"


def load_inputs(config: Config) -> ReportInputs:
    model = ModelRecord.from_dict(read_json(artifacts.need(artifacts.MODEL_JSON, "model")))
    tokens = read_json(artifacts.need(artifacts.TOKENS_META, "tokenize"))
    features = artifacts.read_features()
    per_feature = artifacts.read_per_feature()
    summary = read_json(artifacts.need(artifacts.SUMMARY, "aggregate"))
    summary_details = read_json(artifacts.need(artifacts.SUMMARY_DETAILS, "aggregate"))

    have_layers = sorted(int(x) for x in per_feature["layer"].unique())
    if have_layers != sorted(config.layers):
        raise UserError(f"{artifacts.PER_FEATURE} covers layers {have_layers} but params `layers` is "
                        f"{list(config.layers)}; it is stale: rerun `dvc repro aggregate`")
    if not (per_feature["alpha"] == config.alpha).any():
        raise UserError(f"{artifacts.PER_FEATURE} has no rows at alpha {config.alpha:g}; it is stale: rerun `dvc repro`")
    features = features[features["layer"].isin(config.layers)].reset_index(drop=True)

    details = {}
    for layer in config.layers:
        path = artifacts.need(artifacts.layer_detail(layer), "intervene")
        details[layer] = read_json(path)
        if float(details[layer].get("alpha", config.alpha)) != config.alpha:
            raise UserError(f"{path} holds snippets at alpha {details[layer]['alpha']:g} but params alpha is "
                            f"{config.alpha:g}; it is stale: rerun `dvc repro intervene`")

    figures = {
        "headline": artifacts.need(artifacts.headline_png(config.alpha), "plot"),
        "dce_vs_alpha": artifacts.need(artifacts.DCE_VS_ALPHA_PNG, "plot"),
        "kl_vs_alpha": artifacts.need(artifacts.KL_VS_ALPHA_PNG, "plot"),
        "kl_heatmap": artifacts.need(artifacts.KL_HEATMAP_PNG, "plot"),
    }

    runs = {s: read_json(artifacts.run_record(s)) for s in RUN_STAGES if artifacts.run_record(s).exists()}

    return ReportInputs(alpha=config.alpha, layers=tuple(config.layers), live_percentile=config.live_percentile,
                        model=model, tokens=tokens, features=features, per_feature=per_feature, summary=summary,
                        summary_details=summary_details, details=details, runs=runs, figures=figures)


def git_revision(cwd: Path | None = None) -> str | None:
    """`git rev-parse --short HEAD`, with "+dirty" when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if status else head


def dvc_description() -> str:
    """DVC's version and, inside `dvc exp run`, the experiment's name and baseline."""
    try:
        text = f"dvc {importlib.metadata.version('dvc')}"
    except importlib.metadata.PackageNotFoundError:
        text = "dvc not installed"
    name = os.environ.get("DVC_EXP_NAME")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if name:
        text += f", experiment {name}"
    if baseline:
        text += f" (baseline {baseline[:7]})"
    if not name and not baseline:
        text += " (not run as a DVC experiment)"
    return text


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
