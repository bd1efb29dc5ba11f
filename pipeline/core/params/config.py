"""params.yaml -> one typed, validated `Config`.

Every key of params.yaml is declared once, as a field of `Config` with its kind, default, range
check and help line (`PARAM_SPECS` is read off those declarations).
An unknown key, a wrong type or a value out of range is a `UserError` that names the key and what
is allowed, raised before any long work starts. Keys whose value is `null` take the preset's
choice (see `PRESETS`), so `dvc exp run -S preset=toy` alone switches model, SAEs, corpus,
feature source and corpus size together, while any key set explicitly wins over the preset.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.columns import SCREEN_ESTIMATES
from pipeline.core.errors import UserError
from pipeline.core.modes import MODE_NAMES, MODES

PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class Preset:
    """What a preset supplies for every key the user leaves null."""

    model: str
    sae_release: str
    hook: str
    corpus: str
    feature_source: str
    max_passages: int
    max_len: int
    offline: bool  # runs with no network at all
    # A preset whose model and SAEs the `model` stage builds (the toy): their depth and SAE folder names, known
    # before the files exist, so `plan` and the checks can answer at second 1.
    built_layers: int | None = None
    built_sae_folder: str | None = None  # "{layer}" is filled in
    # The SAE id of each layer where the release has several SAEs at one hook (Gemma Scope's widths); applied
    # only while sae_release is the preset's own.
    sae_id_template: str | None = None
    # The model's depth: a null `layers` studies every layer 0..n_layers-1 (while the model is the preset's own).
    n_layers: int | None = None

    def built_sae_id(self, layer: int) -> str:
        if self.built_sae_folder is None:
            raise ValueError("this preset's SAEs are not built by the model stage")
        return self.built_sae_folder.format(layer=layer)


PRESETS: dict[str, Preset] = {
    # The study: GPT-2 Small, Joseph Bloom's residual-stream SAEs, WikiText-2 (raw, test split).
    "gpt2-small": Preset(
        model="gpt2-small",
        sae_release="gpt2-small-res-jb",
        hook="resid_post",
        corpus="wikitext-2",
        feature_source="neuronpedia",
        max_passages=200,
        max_len=256,
        offline=False,
        n_layers=12,
    ),
    # Gemma-2-2B with DeepMind's Gemma Scope residual SAEs (JumpReLU, the canonical width-16k one per layer), on
    # WikiText-2. The hub repos are gated: a Hugging Face token and the accepted licence are needed.
    "gemma-2-2b": Preset(
        model="gemma-2-2b",
        sae_release="gemma-scope-2b-pt-res-canonical",
        hook="resid_post",
        corpus="wikitext-2",
        feature_source="neuronpedia",
        max_passages=200,
        max_len=256,
        offline=False,
        sae_id_template="layer_{layer}/width_16k/canonical",
        n_layers=26,
    ),
    # The same pipeline offline: a 12-layer byte-level model and its SAEs, built by the `model`
    # stage into data/toy/ and loaded back like any local model; Python's own documentation
    # (pydoc_data, shipped with CPython) as the corpus.
    "toy": Preset(
        model="data/toy/model",
        sae_release="data/toy/saes",
        hook="resid_post",
        corpus="python-docs",
        feature_source="auto",
        max_passages=64,
        max_len=128,
        offline=True,
        built_layers=12,
        built_sae_folder="blocks.{layer}.hook_resid_post",
        n_layers=12,
    ),
}

HOOKS = ("resid_post", "resid_pre")
FEATURE_SOURCES = ("csv", "neuronpedia", "auto", "screen")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Param:
    """How one params.yaml key is read: its kind, default, help line and check."""

    kind: str  # "int", "float", "str", "int_list", "float_list", "str_list", "str_map"
    default: Any
    help: str
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns what is allowed, or None if ok


def _range(lo: float | None = None, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                return f"a value in [{lo}, {hi}]"
            return f"a value >= {lo}" if lo is not None else f"a value <= {hi}"
        return None

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else "one of " + ", ".join(options)


def _nonempty(v: list) -> str | None:
    return None if len(v) > 0 else "a non-empty list"


def _layers_ok(v: list[int]) -> str | None:
    if not v:
        return "a non-empty list of layer indices"
    if len(set(v)) != len(v):
        dupes = sorted({x for x in v if v.count(x) > 1})
        return f"each layer once (duplicated: {dupes})"
    if min(v) < 0:
        return "layer indices >= 0"
    return None


def _sae_id_template_ok(v: str) -> str | None:
    if "{layer}" not in v:
        return "an SAE id with {layer} where the layer number goes, e.g. layer_{layer}/width_16k/canonical"
    try:
        v.format(layer=0)
    except (KeyError, IndexError, ValueError):
        return "an SAE id whose only placeholder is {layer}"
    return None


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _revisions_ok(v: dict[str, str]) -> str | None:
    for repo, commit in v.items():
        if not _REPO_RE.match(repo):
            return f"hub repo ids such as google/gemma-2-2b or gpt2 as keys ({repo!r} is not one)"
        if not _COMMIT_RE.match(commit):
            return f"a 40-character commit hash per repo ({repo}: {commit!r} is not one; a branch or tag is not a pin)"
    return None


def _positive(v: float) -> str | None:
    return None if v > 0 else "a number > 0"


def _device_ok(v: str) -> str | None:
    return None if DEVICE_RE.match(v) else "auto, cpu, cuda, cuda:N or mps"


def param(kind: str, default: Any, help: str, *, nullable: bool = False,  # noqa: A002 - the help text
          check: Callable[[Any], str | None] | None = None) -> Any:
    """A Config field declared as a params.yaml key: how it is read, its default and its help."""
    return field(metadata={"param": Param(kind, default, help, nullable, check)})


@dataclass(frozen=True)
class Config:
    """The validated parameters, with every null replaced by the preset's choice.

    Each field is one params.yaml key, declared once here with its kind, default, help and check
    (in params.yaml's order); `parse_params` reads them from these declarations."""

    preset: str = param("str", "gpt2-small", "model + SAEs + corpus bundle", check=_choice(tuple(PRESETS)))
    model: str = param("str", None, "TransformerLens model name or local model directory", nullable=True)
    sae_release: str = param("str", None, "SAE-Lens release or local directory of SAEs", nullable=True)
    sae_id_template: str = param("str", None, "the SAE id per layer where a hook has several ({layer} filled in)",
                                 nullable=True, check=_sae_id_template_ok)
    hub_revisions: dict[str, str] = param("str_map", None, "hub repo -> commit the model stage loads (null: the "
                                          "newest)", nullable=True, check=_revisions_ok)
    hook: str = param("str", None, "residual hook the SAEs read", nullable=True, check=_choice(HOOKS))
    corpus: str = param("str", None, "wikitext-2, python-docs or a .txt file", nullable=True)
    layers: tuple[int, ...] = param("int_list", None, "layers to intervene at (null: every layer of the preset's "
                                    "model)", nullable=True, check=_layers_ok)
    alpha: float = param("float", 2.0, "headline scale factor (always in the sweep)")
    # sorted, unique, always contains alpha
    alpha_sweep: tuple[float, ...] = param("float_list", [0.0, 0.5, 1.0, 2.0, 4.0], "scale factors to run", check=_nonempty)
    intervention: str = param("str", "scale", "; ".join(m.summary for m in MODES.values()),
                               check=_choice(MODE_NAMES))
    seed: int = param("int", 1234, "controls passage sampling, toy weights, feature choice", check=_range(0))
    max_passages: int = param("int", None, "passages sampled from the corpus", nullable=True, check=_range(1))
    max_len: int = param("int", None, "tokens per passage, BOS included", nullable=True, check=_range(3))
    feature_source: str = param("str", None, "csv, neuronpedia, auto or screen", nullable=True,
                                check=_choice(FEATURE_SOURCES))
    features_per_layer: int = param("int", 5, "features chosen per layer", check=_range(1))
    features_csv: str = param("str", "data/neuronpedia_features.csv", "curated features for feature_source csv")
    min_density: float = param("float", 1e-4, "lowest firing rate a chosen feature may have", check=_range(0, 1))
    max_density: float = param("float", 0.05, "highest firing rate a chosen feature may have", check=_range(0, 1))
    neuronpedia_max_fetch: int = param("int", 60, "neuronpedia: most candidate features fetched per layer", check=_range(1))
    screen_top_k: int = param("int", 10, "screen: features with the largest estimated effect verified exactly per "
                              "layer", check=_range(0))
    screen_random: int = param("int", 50, "screen: seeded random firing features verified exactly per layer",
                               check=_range(0))
    screen_estimator: str = param("str", "second_order", "screen: the estimates verified against exact runs: first_order "
                                  "((alpha-1) slope), or second_order (also adding (alpha-1)^2/2 of the curvature, "
                                  "for the verified features only)", check=_choice(tuple(SCREEN_ESTIMATES)))
    live_percentile: float = param("float", 90.0, "percentile of activation defining live positions", check=_range(0, 100))
    top_k_tokens: int = param("int", 10, "promoted/suppressed tokens kept per feature", check=_range(1))
    n_snippets: int = param("int", 5, "top-activating contexts kept per feature", check=_range(0))
    control_draws: int = param("int", 8, "random-direction controls per feature and value (0: none; >= 2 to test)",
                               check=_range(0))
    batch_size: int = param("int", 16, "rows per forward pass; halves itself on out-of-memory", check=_range(1))
    device: str = param("str", "auto", "auto, cpu, cuda, cuda:N or mps", check=_device_ok)
    dtype: str = param("str", "float32", "model and SAE dtype", check=_choice(DTYPES))
    generate_alphas: tuple[float, ...] = param("float_list", None, "values generated with (null: the sweep's, "
                                               "identity left out)", nullable=True)
    generate_tokens: int = param("int", 32, "tokens generated per continuation", check=_range(1))
    generate_temperature: float = param("float", 0.7, "temperature of the sampled continuations", check=_positive)
    generate_prompts: tuple[str, ...] = param("str_list", ["The", "I think that", "In the beginning", "My favourite",
                                                           "Today, the"], "neutral prompts continued", check=_nonempty)
    generate_batch_size: int = param("int", 256, "continuations generated together (one KV cache)", check=_range(1))
    toy_lm_steps: int = param("int", 1500, "toy preset: language-model training steps", check=_range(0))
    toy_sae_steps: int = param("int", 1500, "toy preset: SAE training steps per layer", check=_range(0))
    plot_dpi: int = param("int", 150, "resolution of the PNG figures", check=_range(50, 600))

    @property
    def preset_info(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def model_is_local(self) -> bool:
        return is_local_path(self.model)

    @property
    def saes_are_local(self) -> bool:
        return is_local_path(self.sae_release)


PARAM_SPECS: dict[str, Param] = {f.name: f.metadata["param"] for f in fields(Config)}
# Keys whose null value is filled from the preset: a stage reading one depends on `preset` too.
PRESET_KEYS = tuple(f.name for f in fields(Preset) if f.name in PARAM_SPECS)
# Config properties and the keys they read.
DERIVED_KEYS = {"preset_info": ("preset",), "model_is_local": ("model",), "saes_are_local": ("sae_release",),
                # a null sae_id_template is the preset's only while sae_release is the preset's own
                "sae_id_template": ("sae_id_template", "sae_release", "preset"),
                # a null `layers` is every layer of the preset's model
                "layers": ("layers", "preset"),
                # null generate_alphas is resolved from alpha_sweep (as written, not with `alpha` added) and
                # the intervention's identity: a stage reading it depends on those two keys as well.
                "generate_alphas": ("generate_alphas", "alpha_sweep", "intervention")}


def is_local_path(value: str) -> bool:
    """A model or SAE release given as a path (rather than a hub name)."""
    return value.startswith((".", "/", "~")) or value.startswith("data/") or Path(value).is_dir()


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(key: str, field: Param, value: Any, source: str) -> Any:
    where = f"{source}: {key}"
    if value is None:
        if field.nullable:
            return None
        raise UserError(f"{where} is empty; it needs {_kind_text(field.kind)}")
    kind = field.kind
    if kind == "int":
        value = _as_int(where, value)
    elif kind == "float":
        value = _as_float(where, value)
    elif kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where} is {_describe(value)}; it needs a non-empty string")
        value = value.strip()
    elif kind in ("int_list", "float_list"):
        if not isinstance(value, list):
            raise UserError(f"{where} is {_describe(value)}; it needs a list such as [0, 1, 2]")
        conv = _as_int if kind == "int_list" else _as_float
        value = [conv(f"{where}[{i}]", v) for i, v in enumerate(value)]
    elif kind == "str_map":
        if not isinstance(value, dict):
            raise UserError(f"{where} is {_describe(value)}; it needs a mapping such as {{google/gemma-2-2b: <commit>}}")
        value = {_as_str(f"{where} key", k): _as_str(f"{where}[{k}]", v).strip() for k, v in value.items()}
    elif kind == "str_list":
        if not isinstance(value, list):
            raise UserError(f"{where} is {_describe(value)}; it needs a list of strings such as [\"The\"]")
        value = [_as_str(f"{where}[{i}]", v) for i, v in enumerate(value)]
    if field.check is not None:
        allowed = field.check(value)
        if allowed is not None:
            raise UserError(f"{where} is {value!r}; allowed: {allowed}")
    return value


def _kind_text(kind: str) -> str:
    return {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "int_list": "a list of integers",
        "float_list": "a list of numbers",
        "str_list": "a list of strings",
        "str_map": "a mapping of strings",
    }[kind]


def _as_str(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where} is {_describe(v)}; it needs a non-empty string")
    return v


def _as_int(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where} is {_describe(v)}; it needs an integer")
    return v


def _as_float(where: str, v: Any) -> float:
    # `dvc exp run -S alpha=4` writes an int; both are numbers here. Booleans are not.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where} is {_describe(v)}; it needs a number")
    v = float(v)
    if not math.isfinite(v):
        raise UserError(f"{where} is {v}; it needs a finite number")
    return v


def parse_params(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a params mapping (as read from YAML) and resolve the preset's defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of keys to values, got {type(raw).__name__}")
    for key in raw:
        if key not in PARAM_SPECS:
            close = difflib.get_close_matches(str(key), list(PARAM_SPECS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"{source}: unknown key '{key}'{hint}; allowed keys: {', '.join(PARAM_SPECS)}"
            )
    values = {k: _coerce(k, f, raw.get(k, f.default), source) for k, f in PARAM_SPECS.items()}

    preset = PRESETS[values["preset"]]
    for key in ("model", "sae_release", "hook", "corpus", "feature_source", "max_passages", "max_len"):
        if values[key] is None:
            values[key] = getattr(preset, key)
    if values["sae_id_template"] is None and values["sae_release"] == preset.sae_release:
        values["sae_id_template"] = preset.sae_id_template

    if values["min_density"] > values["max_density"]:
        raise UserError(
            f"{source}: min_density ({values['min_density']}) is above max_density "
            f"({values['max_density']}); allowed: min_density <= max_density"
        )
    # The headline alpha is always part of the sweep; the sweep is kept sorted and unique.
    # Generation's values, when not given, are the sweep as written minus the intervention's identity:
    # deliberately not the headline alpha, so `-S alpha=4` reruns no generation.
    identity = MODES[values["intervention"]].identity
    if values["generate_alphas"] is None:
        values["generate_alphas"] = [a for a in values["alpha_sweep"] if a != identity]
    values["generate_alphas"] = tuple(sorted(set(values["generate_alphas"])))
    values["generate_prompts"] = tuple(values["generate_prompts"])
    sweep = sorted(set(values["alpha_sweep"]) | {values["alpha"]})
    values["alpha_sweep"] = tuple(sweep)
    values["layers"] = tuple(_every_layer(values, preset, source) if values["layers"] is None else values["layers"])
    return Config(**values)


def _every_layer(values: dict[str, Any], preset: Preset, source: str) -> list[int]:
    """A null `layers`: every layer of the preset's model, known before anything loads (Preset.n_layers)."""
    if values["model"] != preset.model or preset.n_layers is None:
        raise UserError(f"{source}: layers is null, which means every layer of the preset's model, but model is "
                        f"{values['model']!r} (preset {values['preset']}: {preset.model!r}); list the layers, e.g. "
                        "layers: [0, 1, 2]")
    return list(range(preset.n_layers))


def load_config(path: str | Path = PARAMS, overrides: Sequence[str] = ()) -> Config:
    """The params file, with `overrides` ("key=value", the value read as YAML, as `dvc exp run -S` reads it)
    applied on top, validated."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found; run from the repository root or pass --params FILE")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if overrides:
        if raw is not None and not isinstance(raw, dict):
            raise UserError(f"{path} must be a mapping of keys to values, got {type(raw).__name__}")
        raw = {**(raw or {}), **parse_overrides(overrides)}
    return parse_params(raw, source=f"{path} with -S" if overrides else str(path))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """{"key": value} from "key=value" strings (each value read as YAML: `layers=[0,1]`, `alpha=4`)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"-S expects key=value (as `dvc exp run -S`), got {item!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"-S {item}: the value is not valid YAML") from None
    return parsed
