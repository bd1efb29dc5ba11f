"""The committed dvc.lock: a fresh clone's first `dvc exp run -S preset=toy` warns about nothing.

`dvc exp run` first checks the workspace out to its baseline (`dvc checkout --force
--allow-missing`), restoring every cached output that dvc.lock records. An output with no hash in
the lock (a fresh clone with no lock, or a stage or output added since the lock was refreshed)
prints `WARNING: No file hash info found for '<output>'. It won't be created.`, once per output.
With a hash but no cache (no clone has the outputs: there is no remote) DVC stays silent and the
run creates them. The end-to-end check, a whole first `dvc exp run` with no WARNING line, is in
tests/e2e/test_dvc_study.py.
"""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT, make_project_copy, run_dvc

REFRESH = ("refresh dvc.lock (CONTRIBUTING.md, Refreshing dvc.lock: on a fresh clone run `dvc exp run -S preset=toy`, "
           "restore params.yaml, commit dvc.lock)")


def _as_toy(project):
    """params.yaml as `dvc exp run -S preset=toy` leaves it before the checkout."""
    params = project / "params.yaml"
    text, n = re.subn(r"^preset: gpt2-small\b", "preset: toy", params.read_text(), count=1, flags=re.M)
    assert n == 1, "params.yaml no longer starts from `preset: gpt2-small`"
    params.write_text(text)


def test_a_fresh_clones_first_checkout_prints_no_warning(tmp_path):
    project = make_project_copy(tmp_path / "clone")
    _as_toy(project)
    result = run_dvc(["checkout", "--force", "--allow-missing"], project, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "WARNING" not in out, f"{REFRESH}:\n{out}"


def test_without_the_lock_the_same_checkout_warns_per_output(tmp_path):
    """The check above can fail: with no dvc.lock every cached output warns."""
    project = make_project_copy(tmp_path / "clone")
    _as_toy(project)
    (project / "dvc.lock").unlink()
    result = run_dvc(["checkout", "--force", "--allow-missing"], project, timeout=120)
    warned = re.findall(r"No file hash info found for '([^']+)'", result.stdout + result.stderr)
    assert any(path.endswith("data/toy") for path in warned), warned
    assert any(path.endswith("metrics/layers") for path in warned), warned


def test_the_lock_records_the_toy_preset_and_every_stage():
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(lock) == set(dvc), REFRESH
    assert lock["model"]["params"]["params.yaml"]["preset"] == "toy"
    for name, stage in lock.items():
        for out in stage.get("outs", []):
            assert out.get("md5"), f"{name}: {out['path']} has no hash; {REFRESH}"
