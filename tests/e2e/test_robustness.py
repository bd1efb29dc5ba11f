"""Interruptions and reruns, through the real command line and DVC (bad input: tests/stages/test_bad_input.py).

- a NaN metric stops the stage in one line naming layer, feature and alpha, and writes nothing;
- Ctrl-C in the middle of `dvc repro` leaves only whole files, and the rerun resumes after the
  stages already finished; SIGTERM in the middle of a stage leaves its output absent or whole;
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

from tests.conftest import GIT_ENV, ROOT, copy_of_toy_study, make_project_copy, run_cli, run_dvc

pytestmark = pytest.mark.slow

# the interrupted `dvc repro` and its fresh twin (with four layers, so the intervene stage runs long enough to be
# interrupted in its work)
SMALL = {"preset": "toy", "layers": [0, 1], "max_passages": 8, "max_len": 32, "toy_lm_steps": 0, "toy_sae_steps": 0,
         "screen_top_k": 3, "screen_random": 6}
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
def study(toy_study, tmp_path_factory) -> Path:
    """A copy of the shared finished toy study, for tests that break and rebuild its files."""
    return copy_of_toy_study(toy_study, tmp_path_factory.mktemp("robust") / "study")


def test_a_nan_metric_stops_the_stage_naming_layer_feature_and_alpha(study):
    """Poison one decoder row of layer 11's SAE: the stage refuses rather than writing NaNs."""
    from safetensors.torch import load_file, save_file

    features = pd.read_csv(study / "data/features.csv")
    feature = int(features[features["layer"] == 11]["feature"].iloc[0])
    weights = study / "data/toy/saes/blocks.11.hook_resid_post/sae_weights.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    state["W_dec"][feature] = float("nan")
    save_file(state, weights)
    (study / "metrics/layers/layer_11.csv").unlink()
    layer_0 = study / "metrics/layers/layer_0.csv"
    layer_0.write_text("the stage must not touch this file\n")
    try:
        result = run_cli(["--params", "small.yaml", "intervene"], study, timeout=300)
    finally:
        weights.write_bytes(original)
    assert result.returncode == 2, result.stderr
    assert f"layer 11 feature {feature} alpha 0: " in result.stderr and "is nan" in result.stderr
    # nothing written: neither the poisoned layer nor the healthy one
    assert not (study / "metrics/layers/layer_11.csv").exists()
    assert layer_0.read_text() == "the stage must not touch this file\n"
    assert run_cli(["--params", "small.yaml", "intervene"], study).returncode == 0
    _whole(layer_0)


def _whole(path: Path) -> None:
    """The file parses completely (a truncated CSV or JSON would not)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
        if path.parent.name == "layers":
            assert len(frame) and len(frame) % frame["alpha"].nunique() == 0  # every feature at every alpha
    elif path.suffix == ".npy":
        np.load(path)


def test_sigterm_mid_stage_leaves_the_output_absent_or_whole(study):
    target = study / "metrics/layers/layer_0.csv"
    for delay in (0.5, 2.0, 4.0):
        target.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--params", "small.yaml", "intervene"],
                                cwd=study, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})  # the toy study folder holds no code
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 143, -signal.SIGTERM), err
        if target.exists():
            _whole(target)
        assert not list(study.rglob(".*.tmp")), "a temporary file was left behind"
    assert run_cli(["--params", "small.yaml", "intervene"], study).returncode == 0
    _whole(target)


def _running(pid: int, words: list[str]) -> bool:
    """Whether a process under `pid` runs a command line with `words` in a row (e.g. a DVC stage's command)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            line = child.cmdline()
        except psutil.Error:
            continue
        if any(line[i:i + len(words)] == words for i in range(len(line))):
            return True
    return False


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """`dvc repro` interrupted with Ctrl-C while the intervene stage runs, then run again to the end."""
    project = make_project_copy(tmp_path_factory.mktemp("interrupted"))
    write_params(project, "params.yaml", layers=[0, 1, 2, 3])
    env = {**os.environ, **GIT_ENV}
    dvc = str(Path(sys.executable).parent / "dvc")
    # As from a terminal: a test runner started in the background inherits SIGINT ignored, and an
    # ignored signal stays ignored across exec, so give the study the default Ctrl-C behaviour.
    proc = subprocess.Popen([dvc, "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 900  # model, tokenize, screen and features on a loaded 2-core machine
    while not _running(proc.pid, ["pipeline", "intervene"]):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(2.0)  # inside the stage's work
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


def test_ctrl_c_during_dvc_repro_keeps_finished_stages_and_resumes(resumed):
    assert (resumed / "interrupted.ok").exists()  # outputs were whole right after the interrupt
    log = (resumed / "resume.log").read_text()
    assert "Stage 'model' didn't change, skipping" in log
    assert "Stage 'tokenize' didn't change, skipping" in log
    assert "Running stage 'intervene'" in log
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
