"""Every artifact of the pipeline: its path, written once, and the typed reader and writer of each
one that stages hand to each other.

dvc.yaml names the same files (it cannot import Python); `tests/contracts/test_dvc_yaml.py` checks that the
two agree. All paths are relative to the repository root, where DVC runs each stage. Stages read
each other's outputs through this module only, so no stage imports another. Readers import numpy
and pandas when called, so `plan` and `check` (which import this module) stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.columns import (
    FEATURE_COLUMNS,
    GENERATION_COLUMNS,
    PER_FEATURE_COLUMNS,
    SCREEN_AGREEMENT_COLUMNS,
    SCREEN_COLUMNS,
    SCREEN_RANK_COLUMNS,
    SCREEN_VERIFICATION_COLUMNS,
)
from pipeline.core.errors import UserError
from pipeline.core.io import read_json, write_csv, write_json, write_npy

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

DATA = Path("data")
MODEL_JSON = DATA / "model.json"
TOKENS = DATA / "tokens.npy"
TOKENS_META = DATA / "tokens.json"
FEATURES = DATA / "features.csv"
FEATURES_TEMPLATE = DATA / "neuronpedia_features_template.csv"
DOCUMENTED_FEATURES = DATA / "res_jb_documented_features.csv"  # an input in git: neuronpedia candidates
GEMMA_SCOPE_DOCUMENTED = DATA / "gemma_scope_documented_features.csv"  # the same for Gemma Scope (layer 20 only)
DOCUMENTED_FEATURE_LISTS = (DOCUMENTED_FEATURES, GEMMA_SCOPE_DOCUMENTED)  # each row names its Neuronpedia source
NEURONPEDIA_CACHE = DATA / "neuronpedia_cache"
DETAIL_DIR = DATA / "detail"
RUNS_DIR = DATA / "runs"
GENERATIONS = DATA / "generations.json"  # stage generate: every prompt and continuation, per layer

METRICS = Path("metrics")
LAYER_METRICS_DIR = METRICS / "layers"
PER_FEATURE = METRICS / "per_feature_metrics.csv"
PER_LAYER = METRICS / "per_layer_summary.csv"
SUMMARY = METRICS / "summary.json"  # the headline: the one file dvc.yaml declares under metrics
SUMMARY_DETAILS = METRICS / "summary_details.json"  # per layer, generation per value, the sanity checks
GENERATION_METRICS = METRICS / "generation.csv"  # stage generate: one row per (layer, feature, alpha, decoding)
SCREEN_DIR = METRICS / "screen"  # stage screen: every feature of every layer, and the exact verification
# stage screen: the same per-layer tables without the headline alpha's columns, which `features` reads, so that
# `-S alpha=4` (which reruns the screen for its estimate at alpha) leaves features.csv and generation alone
SCREEN_RANKS_DIR = DATA / "screen"
SCREEN_VERIFICATION = SCREEN_DIR / "verification.csv"  # one row per verified feature and value of the sweep
SCREEN_AGREEMENT = SCREEN_DIR / "agreement.csv"  # per (layer, alpha, estimator, subset)
SCREEN_AGREEMENT_SUMMARY = SCREEN_DIR / "agreement.json"  # for `dvc metrics diff --targets`, not in summary.json

PLOTS = Path("plots")
LAYER_DCE_CSV = PLOTS / "layer_dce.csv"
ALPHA_SWEEP_CSV = PLOTS / "alpha_sweep.csv"
KL_HEATMAP_CSV = PLOTS / "kl_heatmap.csv"
DCE_VS_ALPHA_PNG = PLOTS / "dce_vs_alpha.png"
KL_VS_ALPHA_PNG = PLOTS / "kl_vs_alpha.png"
KL_HEATMAP_PNG = PLOTS / "kl_heatmap.png"

REPORT_DIR = Path("report")
REPORT_QMD = REPORT_DIR / "report.qmd"
REPORT_HTML = REPORT_DIR / "report.html"
REPORT_GENERATED = REPORT_DIR / "generated"

def preset_dir(preset: str) -> Path:
    """Where the `model` stage keeps what it resolved or built for a preset (e.g. data/toy)."""
    return DATA / preset


def processed_dir(preset: str) -> Path:
    """The processed model and SAE index the `model` stage writes for fast loading (pipeline.load.processed)."""
    return preset_dir(preset) / "processed"


def layer_metrics(layer: int) -> Path:
    return LAYER_METRICS_DIR / f"layer_{layer}.csv"


def screen_table(layer: int) -> Path:
    """metrics/screen/layer_L.csv: one row per SAE feature of layer L."""
    return SCREEN_DIR / f"layer_{layer}.csv"


def screen_ranks(layer: int) -> Path:
    """data/screen/layer_L.csv: metrics/screen/layer_L.csv without its alpha-dependent columns."""
    return SCREEN_RANKS_DIR / f"layer_{layer}.csv"


def layer_detail(layer: int) -> Path:
    return DETAIL_DIR / f"layer_{layer}.json"


def headline_png(alpha: float) -> Path:
    return PLOTS / f"layer_vs_dloss_alpha{alpha:g}.png"


def run_record(stage: str) -> Path:
    """Wall time, device and versions of one stage run (the only outputs that vary run to run)."""
    return RUNS_DIR / f"{stage}.json"


def need(path: Path, stage: str) -> Path:
    """`path`, or one clear line saying which stage makes it."""
    if not path.exists():
        raise UserError(f"{path} not found; run the {stage} stage first (`dvc repro {stage}`)")
    return path


# ---- readers of what stages hand on ------------------------------------------------------------

def read_tokens() -> np.ndarray:
    """data/tokens.npy: int32 [passages, max_len], column 0 = BOS."""
    import numpy as np

    return np.load(need(TOKENS, "tokenize"))


def read_tokens_meta() -> dict[str, Any]:
    return read_json(need(TOKENS_META, "tokenize"))


def read_features(layers: tuple[int, ...] | list[int] | None = None) -> pd.DataFrame:
    """data/features.csv (every column of FEATURE_COLUMNS), optionally only some layers; a label
    that reads "NA" or "null" stays text."""
    import pandas as pd

    frame = pd.read_csv(need(FEATURES, "features"), keep_default_na=False, na_values=[""])
    if layers is not None:
        frame = frame[frame["layer"].isin(list(layers))]
    return frame


def read_generation_metrics() -> pd.DataFrame:
    """metrics/generation.csv (GENERATION_COLUMNS)."""
    import pandas as pd

    return pd.read_csv(need(GENERATION_METRICS, "generate"), keep_default_na=False, na_values=["", "nan", "NaN"])


def read_generations() -> dict[str, Any]:
    """data/generations.json: per layer, the prompts, the features and every continuation."""
    return read_json(need(GENERATIONS, "generate"))


def read_screen_ranks(layer: int) -> pd.DataFrame:
    """data/screen/layer_L.csv (SCREEN_RANK_COLUMNS): what feature_source screen chooses from."""
    import pandas as pd

    path = screen_ranks(layer)
    if not path.exists():
        raise UserError(f"{path} not found; run the screen stage first (`dvc repro screen`), with layer {layer} "
                        "in params `layers`")
    return pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])


def read_screen(layer: int) -> pd.DataFrame:
    """metrics/screen/layer_L.csv (SCREEN_COLUMNS); `verified` is "" for features not run exactly."""
    import pandas as pd

    path = screen_table(layer)
    if not path.exists():
        raise UserError(f"{path} not found; run the screen stage first (`dvc repro screen`), with layer {layer} "
                        "in params `layers`")
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    frame["verified"] = frame["verified"].fillna("").astype(str)
    return frame


def read_screen_verification() -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(need(SCREEN_VERIFICATION, "screen"))


def read_screen_agreement() -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(need(SCREEN_AGREEMENT, "screen"))


def read_per_feature() -> pd.DataFrame:
    """metrics/per_feature_metrics.csv; empty cells are NaN, a token or label "NA" stays text."""
    import pandas as pd

    return pd.read_csv(need(PER_FEATURE, "aggregate"), keep_default_na=False, na_values=["", "nan", "NaN"])


# ---- writers: each checks the artifact's shape before it is written (atomically, pipeline.core.io) ----

def write_tokens(tokens: np.ndarray, meta: dict[str, Any]) -> None:
    """data/tokens.npy (int32 [passages, max_len]) and its record data/tokens.json."""
    if tokens.dtype.name != "int32" or tokens.ndim != 2 or list(tokens.shape) != meta["tokens_shape"]:
        raise ValueError(f"tokens must be int32 {meta['tokens_shape']}, got {tokens.dtype} {list(tokens.shape)}")
    write_npy(TOKENS, tokens)
    write_json(TOKENS_META, meta)


def write_features(frame: pd.DataFrame) -> None:
    if tuple(frame.columns) != FEATURE_COLUMNS:
        raise ValueError(f"{FEATURES} needs the columns {FEATURE_COLUMNS}, got {tuple(frame.columns)}")
    write_csv(FEATURES, frame)


def write_per_feature(frame: pd.DataFrame) -> None:
    if tuple(frame.columns) != PER_FEATURE_COLUMNS:
        raise ValueError(f"{PER_FEATURE} needs the columns {PER_FEATURE_COLUMNS}, got {list(frame.columns)}")
    write_csv(PER_FEATURE, frame)


def write_generation_metrics(frame: pd.DataFrame) -> None:
    if tuple(frame.columns) != GENERATION_COLUMNS:
        raise ValueError(f"{GENERATION_METRICS} needs the columns {GENERATION_COLUMNS}, got {list(frame.columns)}")
    write_csv(GENERATION_METRICS, frame)


def write_screen(tables: dict[int, pd.DataFrame], verification: pd.DataFrame, agreement: pd.DataFrame,
                 summary: dict[str, Any]) -> None:
    """Everything of metrics/screen/: each layer's table, the verification rows, the agreement table and summary."""
    for layer, frame in tables.items():
        if tuple(frame.columns) != SCREEN_COLUMNS:
            raise ValueError(f"{screen_table(layer)} needs the columns {SCREEN_COLUMNS}, got {list(frame.columns)}")
    for path, frame, expected in ((SCREEN_VERIFICATION, verification, SCREEN_VERIFICATION_COLUMNS),
                                  (SCREEN_AGREEMENT, agreement, SCREEN_AGREEMENT_COLUMNS)):
        if tuple(frame.columns) != expected:
            raise ValueError(f"{path} needs the columns {expected}, got {list(frame.columns)}")
    for layer, frame in tables.items():
        write_csv(screen_table(layer), frame)
        write_csv(screen_ranks(layer), frame[list(SCREEN_RANK_COLUMNS)])
    write_csv(SCREEN_VERIFICATION, verification)
    write_csv(SCREEN_AGREEMENT, agreement)
    write_json(SCREEN_AGREEMENT_SUMMARY, summary)
