"""Every artifact path of the pipeline, written once.

dvc.yaml names the same files (it cannot import Python); `tests/test_dvc_yaml.py` checks that the
two agree. All paths are relative to the repository root, where DVC runs each stage.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")

DATA = Path("data")
MODEL_JSON = DATA / "model.json"
TOKENS = DATA / "tokens.npy"
TOKENS_META = DATA / "tokens.json"
FEATURES = DATA / "features.csv"
FEATURES_TEMPLATE = DATA / "neuronpedia_features_template.csv"
NEURONPEDIA_CACHE = DATA / "neuronpedia_cache"
DETAIL_DIR = DATA / "detail"
RUNS_DIR = DATA / "runs"

METRICS = Path("metrics")
LAYER_METRICS_DIR = METRICS / "layers"
PER_FEATURE = METRICS / "per_feature_metrics.csv"
PER_LAYER = METRICS / "per_layer_summary.csv"
SUMMARY = METRICS / "summary.json"

PLOTS = Path("plots")
REPORT_DIR = Path("report")
REPORT_QMD = REPORT_DIR / "report.qmd"
REPORT_HTML = REPORT_DIR / "report.html"
REPORT_GENERATED = REPORT_DIR / "generated"


def preset_dir(preset: str) -> Path:
    """Where the `model` stage keeps what it resolved or built for a preset (e.g. data/toy)."""
    return DATA / preset


def layer_metrics(layer: int) -> Path:
    return LAYER_METRICS_DIR / f"layer_{layer}.csv"


def layer_detail(layer: int) -> Path:
    return DETAIL_DIR / f"layer_{layer}.json"


def run_record(stage: str) -> Path:
    """Wall time, device and versions of one stage run (the only outputs that vary run to run)."""
    return RUNS_DIR / f"{stage}.json"
