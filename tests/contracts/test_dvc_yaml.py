"""dvc.yaml and the package agree: stage names, commands, artifact paths and params keys."""

from __future__ import annotations

import yaml

from pipeline.cli import app
from pipeline.core import artifacts
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _outs(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}


def test_every_stage_is_a_cli_command_and_a_module():
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    for name, stage in STAGES.items():
        cmd = stage["cmd"]
        assert cmd.startswith(f"python -m pipeline {name}"), cmd
        assert name in commands
        assert (ROOT / "pipeline" / "stages" / f"{name}.py").exists()
        assert f"pipeline/stages/{name}.py" in stage["deps"]


def test_artifact_paths_are_the_packages():
    assert {str(artifacts.MODEL_JSON), str(artifacts.run_record("model"))} <= _outs(STAGES["model"])
    assert "data/${preset}" in _outs(STAGES["model"])
    assert {str(artifacts.TOKENS), str(artifacts.TOKENS_META)} <= _outs(STAGES["tokenize"])
    assert {str(artifacts.FEATURES), str(artifacts.NEURONPEDIA_CACHE)} <= _outs(STAGES["features"])
    assert {str(artifacts.LAYER_METRICS_DIR), str(artifacts.DETAIL_DIR), str(artifacts.run_record("intervene"))} == \
        _outs(STAGES["intervene"])
    assert artifacts.layer_metrics(7).parent == artifacts.LAYER_METRICS_DIR
    assert artifacts.layer_detail(7).parent == artifacts.DETAIL_DIR
    assert {str(artifacts.PER_FEATURE), str(artifacts.PER_LAYER), str(artifacts.SUMMARY)} <= _outs(STAGES["aggregate"])
    assert str(artifacts.PLOTS) in _outs(STAGES["plot"])
    assert {str(artifacts.REPORT_HTML), str(artifacts.REPORT_GENERATED)} <= _outs(STAGES["report"])
    assert DVC["metrics"] == [str(artifacts.SUMMARY)]
    summary = next(o for o in STAGES["aggregate"]["outs"] if isinstance(o, dict) and str(artifacts.SUMMARY) in o)
    assert summary[str(artifacts.SUMMARY)]["cache"] is False  # git carries it: `dvc metrics diff` on a fresh clone


def test_stage_params_are_known_keys_and_plot_reads_no_forward_pass_key():
    known = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for stage in STAGES.values():
        assert set(stage.get("params", [])) <= known
    # intervention only words the axes (a change of it re-runs intervene anyway)
    assert set(STAGES["plot"]["params"]) == {"alpha", "intervention", "plot_dpi"}
    assert "plot_dpi" not in STAGES["intervene"]["params"]
    assert "alpha" in STAGES["intervene"]["params"]
    # no stage per layer: the layers a null `layers` resolves to (the preset's every layer) are known only in Python
    assert not any("foreach" in stage for stage in STAGES.values())


def test_every_cached_output_is_ignored_by_the_root_gitignore():
    """DVC writes a .gitignore beside an output git does not ignore yet; the root .gitignore covers them all, so
    no run leaves one behind (and two runs leave the same files)."""
    import subprocess

    from pipeline.core.params.config import PRESETS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = set()
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, spec = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if spec.get("cache", True):
                paths |= {path.replace("${preset}", preset) for preset in PRESETS}

    def ignored(path: str) -> bool:  # a folder output's pattern ends in "/": ask about a file inside it too
        return any(subprocess.run(["git", "check-ignore", "-q", "--no-index", p], cwd=ROOT).returncode == 0
                   for p in (path, f"{path}/a_file"))

    tracked = [p for p in sorted(paths) if not ignored(p)]
    assert tracked == [], f"add to .gitignore: {tracked}"


def test_the_report_reads_the_run_record_of_every_stage_before_it():
    from pipeline.report.inputs import RUN_STAGES

    assert list(RUN_STAGES) == [name for name in STAGES if name != "report"]
