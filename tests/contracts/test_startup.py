"""A stage's start-up: `python -m pipeline` loads its modules with the cyclic garbage collector off
(pipeline/__main__.py) and turns it back on before the stage's work (pipeline.cli)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from pipeline import cli
from tests.conftest import ROOT

SEEN: dict[str, object] = {}


@pytest.fixture(autouse=True)
def repo_params(monkeypatch):
    """The repo's params.yaml, whatever file an earlier in-process CLI call (CliRunner) left in cli's state."""
    monkeypatch.setattr(cli._state, "params", ROOT / "params.yaml")


def record_collector(config) -> str:  # noqa: ARG001 - called by cli._run as a stage function
    SEEN["enabled"] = gc.isenabled()
    SEEN["frozen"] = gc.get_freeze_count()
    return "ran"


def test_a_stage_runs_with_the_collector_back_on_and_the_loaded_objects_frozen():
    gc.disable()
    try:
        assert cli._run("tests.contracts.test_startup:record_collector") == "ran"
    finally:
        gc.unfreeze()
        gc.enable()
    assert SEEN["enabled"] is True
    assert SEEN["frozen"] > 0


def test_with_the_collector_on_already_nothing_is_frozen():
    """In-process callers (the tests, a notebook) keep the collector as they had it."""
    assert gc.isenabled()
    assert cli._run("tests.contracts.test_startup:record_collector") == "ran"
    assert SEEN["enabled"] is True and SEEN["frozen"] == 0


def test_python_dash_m_pipeline_starts_with_the_collector_off():
    probe = ("import gc, runpy, sys; sys.argv = ['pipeline', '--help']; import pipeline.cli as cli; "
             "cli.app = type('A', (), {'__call__': lambda self, **kw: print(gc.isenabled())})(); "
             "runpy.run_module('pipeline', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
