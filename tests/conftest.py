"""Shared fixtures: seeding, network detection for `network` tests, and project copies.

`network` tests run for real where huggingface.co and neuronpedia.org answer and are skipped
(reported as skipped, not passed) where they do not, e.g. in CI here.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.quiet import quiet_library_warnings

ROOT = Path(__file__).resolve().parents[1]
quiet_library_warnings()
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@functools.cache
def network_available() -> bool:
    for host in ("huggingface.co", "www.neuronpedia.org"):
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            return False
    return True


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    needs = [item for item in items if "network" in item.keywords]
    if needs and not network_available():
        skip = pytest.mark.skip(reason="needs the internet (huggingface.co, neuronpedia.org): unreachable here")
        for item in needs:
            item.add_marker(skip)


GIT_ENV = {
    "GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "DVC_NO_ANALYTICS": "1",
}


def project_files() -> list[str]:
    """The files a fresh clone of the working tree would have (tracked + new, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def make_project_copy(dest: Path) -> Path:
    """Copy the working tree into dest and make it a git repo with one commit (DVC needs one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as DVC runs it (the package from this checkout,
    or from cwd when cwd is a project copy)."""
    pythonpath = str(cwd) if (Path(cwd) / "pipeline").is_dir() else str(ROOT)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **GIT_ENV, "PYTHONPATH": pythonpath, **(env or {})})


def run_dvc(args: list[str], cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **GIT_ENV, **(env or {})})


# ---- the shared toy study ------------------------------------------------------------------------------------

# A small toy study (random weights, two layers at both ends of the model): every stage runs once per test
# session, in-process, and the tests that read a finished study share it.
TOY_STUDY_PARAMS = {"preset": "toy", "layers": [0, 11], "max_passages": 8, "max_len": 32, "features_per_layer": 3,
                    "toy_lm_steps": 0, "toy_sae_steps": 0, "n_snippets": 2, "max_density": 0.2,
                    "generate_tokens": 12, "generate_prompts": ["The", "I think"], "screen_top_k": 3,
                    "screen_random": 8}
TOY_STUDY_PARAMS_FILE = "small.yaml"  # in the study's folder: the same params, for the command line
REPORT_STAGE_RESULT = "report_stage.json"  # in the study's folder: what the report stage returned


def toy_study_params(**overrides) -> dict:
    """params.yaml's keys with the shared toy study's values (and `overrides`)."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {**raw, **TOY_STUDY_PARAMS, **overrides}


def run_stages(config) -> None:
    """Every stage of the study up to `plot`, in-process, in the current directory."""
    from pipeline.stages.aggregate import run_aggregate_stage
    from pipeline.stages.features import run_features_stage
    from pipeline.stages.generate import run_generate_stage
    from pipeline.stages.intervene import run_intervene_stage
    from pipeline.stages.model import run_model_stage
    from pipeline.stages.plot import run_plot_stage
    from pipeline.stages.screen import run_screen_stage
    from pipeline.stages.tokenize import run_tokenize_stage

    run_model_stage(config)
    run_tokenize_stage(config)
    run_screen_stage(config)
    run_features_stage(config)
    run_intervene_stage(config)
    run_generate_stage(config)
    run_aggregate_stage(config)
    run_plot_stage(config)


@pytest.fixture(scope="session")
def toy_study(tmp_path_factory) -> Path:
    """The folder of a finished toy study (TOY_STUDY_PARAMS), its report rendered with pandoc. Read it only:
    a test that changes files works on `copy_of_toy_study`."""
    import yaml

    from pipeline.core import artifacts
    from pipeline.core.params.config import parse_params
    from pipeline.stages.report import run_report_stage

    root = tmp_path_factory.mktemp("toy-study")
    (root / artifacts.REPORT_DIR).mkdir()
    shutil.copy2(ROOT / artifacts.REPORT_QMD, root / artifacts.REPORT_QMD)
    (root / TOY_STUDY_PARAMS_FILE).write_text(yaml.safe_dump(toy_study_params(), sort_keys=False))
    config = parse_params(TOY_STUDY_PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_stages(config)
        result = run_report_stage(config, renderer="pandoc")
    (root / REPORT_STAGE_RESULT).write_text(json.dumps(result))
    return root


def copy_of_toy_study(toy_study: Path, dest: Path) -> Path:
    """A copy of the shared study that a test may change."""
    shutil.copytree(toy_study, dest)
    return dest


@pytest.fixture(scope="session")
def hub_twin(tmp_path_factory) -> Path:
    """A tiny hub twin (`python -m pipeline twin DIR`): a Hugging Face cache of stand-ins, built once."""
    from pipeline.twin.build import build_twin

    home = tmp_path_factory.mktemp("twin")
    build_twin(home, "tiny", seed=0)
    return home


@pytest.fixture(scope="session")
def twin(hub_twin) -> Path:
    return hub_twin


@pytest.fixture
def offline_twin(hub_twin, monkeypatch):
    """This process reads the session's hub twin as its Hugging Face cache, offline."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub_twin / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return hub_twin
