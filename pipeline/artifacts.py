"""Every artifact of the pipeline: its path, written once, and the typed reader and writer of each
one that stages hand to each other.

dvc.yaml names the same files (it cannot import Python); `tests/test_dvc_yaml.py` checks that the
two agree. All paths are relative to the repository root, where DVC runs each stage. Stages read
each other's outputs through this module only, so no stage imports another. Readers import numpy
and pandas when called, so `plan` and `check` (which import this module) stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.io import read_json, write_csv, write_json, write_npy

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.hooks import LayerPlan

DATA = Path("data")
MODEL_JSON = DATA / "model.json"
TOKENS = DATA / "tokens.npy"
TOKENS_META = DATA / "tokens.json"
FEATURES = DATA / "features.csv"
FEATURES_TEMPLATE = DATA / "neuronpedia_features_template.csv"
DOCUMENTED_FEATURES = DATA / "res_jb_documented_features.csv"  # an input in git: neuronpedia candidates
NEURONPEDIA_CACHE = DATA / "neuronpedia_cache"
DETAIL_DIR = DATA / "detail"
RUNS_DIR = DATA / "runs"
GENERATIONS = DATA / "generations.json"  # stage generate: every prompt and continuation, per layer

METRICS = Path("metrics")
LAYER_METRICS_DIR = METRICS / "layers"
PER_FEATURE = METRICS / "per_feature_metrics.csv"
PER_LAYER = METRICS / "per_layer_summary.csv"
SUMMARY = METRICS / "summary.json"
GENERATION_METRICS = METRICS / "generation.csv"  # stage generate: one row per (layer, feature, alpha, decoding)

PLOTS = Path("plots")
LAYER_DCE_CSV = PLOTS / "layer_dce.csv"
ALPHA_SWEEP_CSV = PLOTS / "alpha_sweep.csv"
KL_HEATMAP_CSV = PLOTS / "kl_heatmap.csv"
DCE_VS_ALPHA_PNG = PLOTS / "dce_vs_alpha.png"
KL_VS_ALPHA_PNG = PLOTS / "kl_vs_alpha.png"
KL_HEATMAP_PNG = PLOTS / "kl_heatmap.png"
HEADLINE_PNG_GLOB = "layer_vs_dloss_alpha*.png"

REPORT_DIR = Path("report")
REPORT_QMD = REPORT_DIR / "report.qmd"
REPORT_HTML = REPORT_DIR / "report.html"
REPORT_GENERATED = REPORT_DIR / "generated"

# data/features.csv, as every feature source writes it.
FEATURE_COLUMNS = (
    "layer", "feature", "label", "source", "density", "max_act", "neuronpedia_url",
    "np_pos_tokens", "np_neg_tokens", "reason",
)
# metrics/per_feature_metrics.csv, as `aggregate` writes it and `plot` and `report` read it.
PER_FEATURE_COLUMNS = [
    "layer", "feature", "label", "alpha", "intervention", "is_headline",
    "delta_ce_live", "delta_ce_live_se", "delta_ce_live_lo", "delta_ce_live_hi",
    "kl_live", "kl_live_se", "kl_live_lo", "kl_live_hi",
    "p_delta_ce_live", "min_p_delta_ce_live", "p_adj_delta_ce_live", "testable", "significant",
    "ctrl_delta_ce_live", "ctrl_kl_live", "ctrl_kl_live_min", "ctrl_kl_live_max", "ctrl_log_kl_live_sd",
    "ctrl_draws", "ctrl_draws_above", "kl_ratio_random", "p_vs_random", "p_adj_vs_random", "more_than_random",
    "less_than_random",
    "dose_rel_norm", "push_max_act",
    "delta_ce", "delta_ce_se", "delta_ce_lo", "delta_ce_hi", "kl", "kl_se", "kl_lo", "kl_hi",
    "ctrl_delta_ce", "ctrl_kl",
    "sae_context_size", "frac_live_beyond_ctx", "delta_ce_live_in_ctx", "kl_live_in_ctx",
    "n_docs", "n_docs_live", "n_passages_live", "n_docs_firing", "n_passages_firing",
    "n_live", "frac_live", "mean_act_live", "live_threshold", "ce_clean", "ce_int",
    "density", "max_act", "source_density", "source_max_act",
    "top_promoted", "top_suppressed", "np_pos_tokens", "np_neg_tokens",
    "neuronpedia_url", "source", "n_passages", "n_scored",
]
# metrics/generation.csv, as `generate` writes it (measures: pipeline.engine.generation_metrics).
GENERATION_MEASURES = ("concept_act", "concept_frac", "loss", "distinct_1", "distinct_2", "repetition",
                       "promoted_frac")
GENERATION_COLUMNS = [
    "layer", "feature", "alpha", "intervention", "decoding", "n_prompts",
    *(c for m in GENERATION_MEASURES for c in (m, f"{m}_clean")), "frac_changed",
]
# A KL recomputed from float32 logits can come out at about -1e-9 where it is exactly 0.
KL_TOLERANCE = 1e-6


def preset_dir(preset: str) -> Path:
    """Where the `model` stage keeps what it resolved or built for a preset (e.g. data/toy)."""
    return DATA / preset


def processed_dir(preset: str) -> Path:
    """The processed model and SAE index the `model` stage writes for fast loading (pipeline.processed)."""
    return preset_dir(preset) / "processed"


def layer_metrics(layer: int) -> Path:
    return LAYER_METRICS_DIR / f"layer_{layer}.csv"


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


# ---- the model record -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """data/model.json's `model`: what was loaded and where it came from."""

    name: str  # hub name (gpt2-small) or local directory
    source: str  # "hub" or "local"
    n_layers: int
    d_model: int
    n_ctx: int
    d_vocab: int
    from_pretrained_kwargs: dict[str, Any]  # hub: the SAE release's model_from_pretrained_kwargs
    hub_files: tuple[dict[str, str], ...]  # hub: {repo_id, file, revision, blob} per weight file
    weights_sha256: str | None  # local: the weights file's hash


@dataclass(frozen=True)
class LayerEntry:
    """One layer of data/model.json: where the intervention happens and which SAE reads it."""

    layer: int
    hook: str
    resume_at: int
    sae_release: str
    sae_id: str
    neuronpedia: str | None
    d_sae: int
    architecture: str
    sae_hook_name: str | None
    hub_files: tuple[dict[str, str], ...]
    weights_sha256: str | None

    def plan(self) -> LayerPlan:
        from pipeline.hooks import LayerPlan

        return LayerPlan(layer=self.layer, hook=self.hook, resume_at=self.resume_at,
                         sae_release=self.sae_release, sae_id=self.sae_id, neuronpedia=self.neuronpedia)


@dataclass(frozen=True)
class ModelRecord:
    """data/model.json, the `model` stage's record, as one typed object.

    Stages after `model` load the model, SAEs and tokenizer from this record (pipeline.loading),
    never from the preset keys, and for hub models from the Hugging Face cache only: the snapshot
    the model stage resolved."""

    preset: str
    sae_release: str
    hook: str
    availability: str  # "online", "cache" or "local"
    model: ModelEntry
    tokenizer: dict[str, Any]  # the spec pipeline.tokenizer.tokenizer_from_spec builds from
    layers: tuple[LayerEntry, ...]

    @classmethod
    def read(cls) -> ModelRecord:
        if not MODEL_JSON.exists():
            raise UserError(f"{MODEL_JSON} not found; run `dvc repro model` (or `python -m pipeline model`) first")
        return cls.from_dict(read_json(MODEL_JSON))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        m = d["model"]
        model = ModelEntry(name=m["name"], source=m["source"], n_layers=int(m["n_layers"]),
                           d_model=int(m["d_model"]), n_ctx=int(m["n_ctx"]), d_vocab=int(m["d_vocab"]),
                           from_pretrained_kwargs=dict(m.get("from_pretrained_kwargs") or {}),
                           hub_files=tuple(m.get("hub", ())), weights_sha256=m.get("weights_sha256"))
        layers = tuple(
            LayerEntry(layer=int(e["layer"]), hook=e["hook"], resume_at=int(e["resume_at"]),
                       sae_release=e["sae_release"], sae_id=e["sae_id"], neuronpedia=e.get("neuronpedia"),
                       d_sae=int(e["d_sae"]), architecture=e.get("architecture", "?"),
                       sae_hook_name=e.get("sae_hook_name"), hub_files=tuple(e.get("hub", ())),
                       weights_sha256=e.get("weights_sha256"))
            for e in d["layers"])
        return cls(preset=d["preset"], sae_release=d["sae_release"], hook=d["hook"],
                   availability=d.get("availability", "?"), model=model, tokenizer=dict(d["tokenizer"]),
                   layers=layers)

    @property
    def layer_numbers(self) -> list[int]:
        return [entry.layer for entry in self.layers]

    def layer(self, layer: int) -> LayerEntry:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise UserError(f"layer {layer} is not in {MODEL_JSON} (it has {self.layer_numbers}); "
                        "rerun the model stage after changing `layers`")


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


def read_per_feature() -> pd.DataFrame:
    """metrics/per_feature_metrics.csv; empty cells are NaN, a token or label "NA" stays text."""
    import pandas as pd

    return pd.read_csv(need(PER_FEATURE, "aggregate"), keep_default_na=False, na_values=["", "nan", "NaN"])


# ---- writers: each checks the artifact's shape before it is written (atomically, pipeline.io) ----

def write_model_record(record: dict[str, Any]) -> ModelRecord:
    """data/model.json; refused unless it reads back as a ModelRecord."""
    typed = ModelRecord.from_dict(record)
    write_json(MODEL_JSON, record)
    return typed


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
    if list(frame.columns) != PER_FEATURE_COLUMNS:
        raise ValueError(f"{PER_FEATURE} needs the columns {PER_FEATURE_COLUMNS}, got {list(frame.columns)}")
    write_csv(PER_FEATURE, frame)


def write_generation_metrics(frame: pd.DataFrame) -> None:
    if list(frame.columns) != GENERATION_COLUMNS:
        raise ValueError(f"{GENERATION_METRICS} needs the columns {GENERATION_COLUMNS}, got {list(frame.columns)}")
    write_csv(GENERATION_METRICS, frame)
