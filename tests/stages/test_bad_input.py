"""Bad input through the command line: exit status 2, one line naming the key, file, row or value and what
is allowed, no traceback, and no output created or changed.

The commands run in-process through Typer's CliRunner on a copy of the shared toy study (tests/conftest.py):
what is tested is the command line's handling of the error, not a new process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import copy_of_toy_study, toy_study_params

OUTPUT_DIRS = ("data", "metrics", "plots")


def write_params(project: Path, name: str, **overrides) -> Path:
    path = project / name
    path.write_text(yaml.safe_dump(toy_study_params(**overrides), sort_keys=False))
    return path


def snapshot(project: Path) -> dict[str, str]:
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in OUTPUT_DIRS for p in sorted((project / d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(toy_study, tmp_path_factory) -> Path:
    return copy_of_toy_study(toy_study, tmp_path_factory.mktemp("bad-input") / "study")


def invoke(study: Path, args: list[str], monkeypatch):
    monkeypatch.chdir(study)
    return CliRunner().invoke(app, args)


def _csv(project: Path, name: str, text: str) -> dict:
    (project / name).write_text(text)
    return {"feature_source": "csv", "features_csv": name}


HEADER = "layer,feature,label\n"
GOOD_ROWS = "".join(f"{layer},{f},x\n" for layer in (0, 11) for f in range(3))

# (case id, params overrides or a callable(project) -> overrides, command, expected text in the message)
CASES = [
    ("unknown key", {"alpah": 2}, ["intervene"], "unknown key 'alpah' (did you mean 'alpha'?)"),
    ("wrong type", {"max_passages": "many"}, ["tokenize"], "max_passages is 'many' (str); it needs an integer"),
    ("alpha nan", {"alpha": float("nan")}, ["intervene"], "alpha is nan; it needs a finite number"),
    ("sweep inf", {"alpha_sweep": [0, float("inf")]}, ["aggregate"], "alpha_sweep[1] is inf"),
    ("empty sweep", {"alpha_sweep": []}, ["intervene"], "alpha_sweep is []; allowed: a non-empty list"),
    ("max_len < 3", {"max_len": 2}, ["tokenize"], "max_len is 2; allowed: a value >= 3"),
    ("max_len > context", {"max_len": 4096}, ["tokenize"], "max_len is 4096 but the model's context is 128 tokens"),
    ("max_passages < 1", {"max_passages": 0}, ["tokenize"], "max_passages is 0; allowed: a value >= 1"),
    ("more passages than windows", {"max_passages": 10**6}, ["tokenize"], "but corpus 'python-docs' has only"),
    ("layer out of range", {"layers": [0, 12]}, ["model"], "layers [12] are out of range; the model has 12 layers"),
    ("layer duplicated", {"layers": [0, 0]}, ["features"], "each layer once (duplicated: [0])"),
    ("layers empty", {"layers": []}, ["features"], "layers is []; allowed: a non-empty list"),
    ("features_per_layer < 1", {"features_per_layer": 0}, ["features"], "features_per_layer is 0"),
    ("features_per_layer > d_sae", {"features_per_layer": 513}, ["features"], "but layer 0's SAE has 512 features"),
    ("live_percentile", {"live_percentile": 150}, ["intervene"], "live_percentile is 150.0; allowed: a value in [0, 100]"),
    ("batch_size < 1", {"batch_size": 0}, ["intervene"], "batch_size is 0; allowed: a value >= 1"),
    ("unknown preset", {"preset": "gpt5"}, ["model"], "preset is 'gpt5'; allowed: one of gpt2-small, gemma-2-2b, toy"),
    ("unknown device", {"device": "gpu"}, ["intervene"], "device is 'gpu'; allowed: auto, cpu"),
    ("unknown dtype", {"dtype": "int8"}, ["intervene"], "dtype is 'int8'; allowed: one of float32"),
    ("cuda where none", {"device": "cuda"}, ["intervene"], "device is 'cuda' but CUDA is not available here"),
    ("csv missing", {"feature_source": "csv", "features_csv": "nope.csv"}, ["features"], "features_csv nope.csv not found"),
    ("csv empty", lambda p: _csv(p, "empty.csv", ""), ["features"], "empty.csv is empty"),
    ("csv missing column", lambda p: _csv(p, "cols.csv", "layer,label\n0,x\n"), ["features"], "lacks column(s) feature"),
    ("csv non-integer", lambda p: _csv(p, "nonint.csv", HEADER + "0,1.5,x\n" + GOOD_ROWS), ["features"],
     "row 2: feature is '1.5'; it needs a whole number"),
    ("csv negative", lambda p: _csv(p, "neg.csv", HEADER + "0,-3,x\n" + GOOD_ROWS), ["features"], "row 2: feature -3 is negative"),
    ("csv too large", lambda p: _csv(p, "big.csv", HEADER + "0,512,x\n" + GOOD_ROWS), ["features"],
     "row 2: feature 512 is out of range for layer 0; allowed: 0..511"),
    ("csv layer not studied", lambda p: _csv(p, "layer.csv", HEADER + "5,1,x\n" + GOOD_ROWS), ["features"],
     "row 2: layer 5 is not in params `layers` [0, 11]"),
    ("csv duplicate", lambda p: _csv(p, "dup.csv", HEADER + "0,1,x\n0,1,y\n" + GOOD_ROWS), ["features"],
     "row 3: layer 0 feature 1 repeats row 2"),
    ("csv too few", lambda p: _csv(p, "few.csv", HEADER + "0,1,x\n11,1,x\n"), ["features"], "layer 0 has 1 feature(s) but features_per_layer is 3"),
]


@pytest.mark.parametrize("case,overrides,command,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(study, monkeypatch, case, overrides, command,  # noqa: ARG001
                                                         expected):
    if callable(overrides):
        overrides = overrides(study)
    params = write_params(study, "bad.yaml", **overrides)
    before = snapshot(study)
    result = invoke(study, ["--params", params.name, *command], monkeypatch)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(study) == before


def test_debug_shows_the_traceback(study, monkeypatch):
    params = write_params(study, "bad.yaml", device="cuda")
    result = invoke(study, ["--params", params.name, "--debug", "intervene"], monkeypatch)
    assert result.exit_code != 0
    assert result.exception is not None and "CUDA is not available" in str(result.exception)
