"""Bad input, interruptions and reruns, through the real command line and DVC.

- every bad input: exit status 2, one line naming the key / file / row / value and what is
  allowed, no traceback, and no output file created or changed;
- Ctrl-C in the middle of `dvc repro` leaves only whole files, and the rerun resumes with the
  layers already finished; SIGTERM in the middle of a stage leaves its output absent or whole;
- the same params give byte-identical outputs in two fresh copies of the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import GIT_ENV, ROOT, make_project_copy, run_cli, run_dvc

pytestmark = pytest.mark.slow

SMALL = {"preset": "toy", "layers": [0, 1], "max_passages": 8, "max_len": 32, "toy_lm_steps": 0, "toy_sae_steps": 0}
OUTPUT_DIRS = ("data", "metrics", "plots")
VARYING = ("data/runs",)  # wall time, date, host: the only outputs that differ run to run


def write_params(project: Path, name: str, **overrides) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(SMALL)
    raw.update(overrides)
    path = project / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(project: Path) -> dict[str, str]:
    out = {}
    for d in OUTPUT_DIRS:
        for p in sorted((project / d).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(project))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A finished small toy study (stages run one by one through the CLI)."""
    project = make_project_copy(tmp_path_factory.mktemp("robust"))
    write_params(project, "small.yaml")
    for args in (["model"], ["tokenize"], ["features"], ["intervene", "--layer", "0"], ["intervene", "--layer", "1"],
                 ["generate"], ["aggregate"], ["plot"]):
        result = run_cli(["--params", "small.yaml", *args], project)
        assert result.returncode == 0, result.stderr
    return project


def _csv(project: Path, name: str, text: str) -> dict:
    (project / name).write_text(text)
    return {"feature_source": "csv", "features_csv": name}


HEADER = "layer,feature,label\n"
GOOD_ROWS = "".join(f"{layer},{f},x\n" for layer in (0, 1) for f in range(5))

# (case id, params overrides or a callable(project) -> overrides, command, expected text in the message)
CASES = [
    ("unknown key", {"alpah": 2}, ["intervene", "--layer", "0"], "unknown key 'alpah' (did you mean 'alpha'?)"),
    ("wrong type", {"max_passages": "many"}, ["tokenize"], "max_passages is 'many' (str); it needs an integer"),
    ("alpha nan", {"alpha": float("nan")}, ["intervene", "--layer", "0"], "alpha is nan; it needs a finite number"),
    ("sweep inf", {"alpha_sweep": [0, float("inf")]}, ["aggregate"], "alpha_sweep[1] is inf"),
    ("empty sweep", {"alpha_sweep": []}, ["intervene", "--layer", "0"], "alpha_sweep is []; allowed: a non-empty list"),
    ("max_len < 3", {"max_len": 2}, ["tokenize"], "max_len is 2; allowed: a value >= 3"),
    ("max_len > context", {"max_len": 4096}, ["tokenize"], "max_len is 4096 but the model's context is 128 tokens"),
    ("max_passages < 1", {"max_passages": 0}, ["tokenize"], "max_passages is 0; allowed: a value >= 1"),
    ("more passages than windows", {"max_passages": 10**6}, ["tokenize"], "but corpus 'python-docs' has only"),
    ("layer out of range", {"layers": [0, 12]}, ["model"], "layers [12] are out of range; the model has 12 layers"),
    ("layer duplicated", {"layers": [0, 0]}, ["features"], "each layer once (duplicated: [0])"),
    ("layers empty", {"layers": []}, ["features"], "layers is []; allowed: a non-empty list"),
    ("features_per_layer < 1", {"features_per_layer": 0}, ["features"], "features_per_layer is 0"),
    ("features_per_layer > d_sae", {"features_per_layer": 513}, ["features"], "but layer 0's SAE has 512 features"),
    ("live_percentile", {"live_percentile": 150}, ["intervene", "--layer", "0"], "live_percentile is 150.0; allowed: a value in [0, 100]"),
    ("batch_size < 1", {"batch_size": 0}, ["intervene", "--layer", "0"], "batch_size is 0; allowed: a value >= 1"),
    ("unknown preset", {"preset": "gpt5"}, ["model"], "preset is 'gpt5'; allowed: one of gpt2-small, toy"),
    ("unknown device", {"device": "gpu"}, ["intervene", "--layer", "0"], "device is 'gpu'; allowed: auto, cpu"),
    ("unknown dtype", {"dtype": "int8"}, ["intervene", "--layer", "0"], "dtype is 'int8'; allowed: one of float32"),
    ("cuda where none", {"device": "cuda"}, ["intervene", "--layer", "0"], "device is 'cuda' but CUDA is not available here"),
    ("csv missing", {"feature_source": "csv", "features_csv": "nope.csv"}, ["features"], "features_csv nope.csv not found"),
    ("csv empty", lambda p: _csv(p, "empty.csv", ""), ["features"], "empty.csv is empty"),
    ("csv missing column", lambda p: _csv(p, "cols.csv", "layer,label\n0,x\n"), ["features"], "lacks column(s) feature"),
    ("csv non-integer", lambda p: _csv(p, "nonint.csv", HEADER + "0,1.5,x\n" + GOOD_ROWS), ["features"],
     "row 2: feature is '1.5'; it needs a whole number"),
    ("csv negative", lambda p: _csv(p, "neg.csv", HEADER + "0,-3,x\n" + GOOD_ROWS), ["features"], "row 2: feature -3 is negative"),
    ("csv too large", lambda p: _csv(p, "big.csv", HEADER + "0,512,x\n" + GOOD_ROWS), ["features"],
     "row 2: feature 512 is out of range for layer 0; allowed: 0..511"),
    ("csv layer not studied", lambda p: _csv(p, "layer.csv", HEADER + "5,1,x\n" + GOOD_ROWS), ["features"],
     "row 2: layer 5 is not in params `layers` [0, 1]"),
    ("csv duplicate", lambda p: _csv(p, "dup.csv", HEADER + "0,1,x\n0,1,y\n" + GOOD_ROWS), ["features"],
     "row 3: layer 0 feature 1 repeats row 2"),
    ("csv too few", lambda p: _csv(p, "few.csv", HEADER + "0,1,x\n1,1,x\n"), ["features"], "layer 0 has 1 feature(s) but features_per_layer is 5"),
]


@pytest.mark.parametrize("case,overrides,command,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(study, case, overrides, command, expected):  # noqa: ARG001
    if callable(overrides):
        overrides = overrides(study)
    params = write_params(study, "bad.yaml", **overrides)
    before = snapshot(study)
    result = run_cli(["--params", params.name, *command], study, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(study) == before


def test_debug_shows_the_traceback(study):
    params = write_params(study, "bad.yaml", device="cuda")
    result = run_cli(["--params", params.name, "--debug", "intervene", "--layer", "0"], study, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_nan_metric_stops_the_stage_naming_layer_feature_and_alpha(study):
    """Poison one decoder row of layer 1's SAE: the stage refuses rather than writing NaNs."""
    from safetensors.torch import load_file, save_file

    features = pd.read_csv(study / "data/features.csv")
    feature = int(features[features["layer"] == 1]["feature"].iloc[0])
    weights = study / "data/toy/saes/blocks.1.hook_resid_post/sae_weights.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    state["W_dec"][feature] = float("nan")
    save_file(state, weights)
    (study / "metrics/layers/layer_1.csv").unlink()
    try:
        result = run_cli(["--params", "small.yaml", "intervene", "--layer", "1"], study, timeout=300)
    finally:
        weights.write_bytes(original)
    assert result.returncode == 2, result.stderr
    assert f"layer 1 feature {feature} alpha 0: " in result.stderr and "is nan" in result.stderr
    assert not (study / "metrics/layers/layer_1.csv").exists()
    assert run_cli(["--params", "small.yaml", "intervene", "--layer", "1"], study).returncode == 0


def _whole(path: Path) -> None:
    """The file parses completely (a truncated CSV or JSON would not)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
        if path.parent.name == "layers":
            assert len(frame) == 5 * 5
    elif path.suffix == ".npy":
        np.load(path)


def test_sigterm_mid_stage_leaves_the_output_absent_or_whole(study):
    target = study / "metrics/layers/layer_0.csv"
    for delay in (0.5, 2.0, 4.0):
        target.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--params", "small.yaml", "intervene", "--layer", "0"],
                                cwd=study, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(study)})
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 143, -signal.SIGTERM), err
        if target.exists():
            _whole(target)
        assert not list(study.rglob(".*.tmp")), "a temporary file was left behind"
    assert run_cli(["--params", "small.yaml", "intervene", "--layer", "0"], study).returncode == 0
    _whole(target)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """`dvc repro` interrupted with Ctrl-C after two of four layers, then run again to the end."""
    project = make_project_copy(tmp_path_factory.mktemp("interrupted"))
    write_params(project, "params.yaml", layers=[0, 1, 2, 3])
    env = {**os.environ, **GIT_ENV}
    dvc = str(Path(sys.executable).parent / "dvc")
    # As from a terminal: a test runner started in the background inherits SIGINT ignored, and an
    # ignored signal stays ignored across exec, so give the study the default Ctrl-C behaviour.
    proc = subprocess.Popen([dvc, "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (project / "metrics/layers/layer_1.csv").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    # Ctrl-C reaches the whole foreground group. DVC ignores SIGINT while a stage's command runs
    # (the command gets it) but a press between two stages can be absorbed, so press until it stops.
    while proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    out = proc.stdout.read()
    assert proc.returncode != 0, out
    # DVC words an interrupt by when it lands: inside a stage's command "failed to reproduce", between two
    # stages "interrupted by the user"; either way it stopped
    assert "failed to reproduce" in out or "interrupted by the user" in out, out
    for d in OUTPUT_DIRS:
        for p in (project / d).rglob("*"):
            if p.is_file():
                _whole(p)
    assert not list(project.rglob(".*.tmp"))
    project.joinpath("interrupted.ok").touch()

    again = run_dvc(["repro"], project)
    assert again.returncode == 0, again.stdout + again.stderr
    (project / "resume.log").write_text(again.stdout)
    return project


def test_ctrl_c_during_dvc_repro_keeps_finished_layers_and_resumes(resumed):
    assert (resumed / "interrupted.ok").exists()  # outputs were whole right after the interrupt
    log = (resumed / "resume.log").read_text()
    assert "Stage 'intervene@0' didn't change, skipping" in log
    assert "Stage 'model' didn't change, skipping" in log
    assert "Running stage 'intervene@3'" in log
    assert (resumed / "metrics/summary.json").exists()


def test_same_params_give_byte_identical_outputs_in_two_fresh_copies(resumed, tmp_path):
    """The interrupted-and-resumed run against an uninterrupted one in another fresh copy."""
    fresh = make_project_copy(tmp_path / "fresh")
    write_params(fresh, "params.yaml", layers=[0, 1, 2, 3])
    result = run_dvc(["repro"], fresh)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [{k: v for k, v in snapshot(p).items() if not k.startswith(VARYING)} for p in (resumed, fresh)]
    assert runs[0].keys() == runs[1].keys()
    different = [k for k in runs[0] if runs[0][k] != runs[1][k]]
    assert different == []
    assert any(k.endswith(".png") for k in runs[0]) and any(k.endswith(".npy") for k in runs[0])
