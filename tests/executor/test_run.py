"""pipeline.executor.run_shards on small functions: results in the specs' order, finished shards stored and
reused, a shard that raises resubmitted and then reported in one line, a UserError not retried. The jobs are
real subprocesses (submitit's local cluster) started in the repository, as a stage starts them."""

from __future__ import annotations

import pytest

from pipeline.core.errors import UserError
from pipeline.executor import ExecutorSettings, ShardWork, run_shards
from tests import executor_fns
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # a job imports the shard function by name, from where the stage runs


@pytest.fixture
def settings(tmp_path):
    return ExecutorSettings(executor="submitit", cluster="local", shards=3, retries=1, folder=tmp_path / "executor")


def work(fn, inputs, specs, fingerprint="f" * 64) -> ShardWork:
    return ShardWork(stage="test@0", fn=fn, inputs=inputs, specs=specs, fingerprint=fingerprint)


def test_results_come_back_in_the_specs_order_and_a_rerun_reuses_them(settings):
    specs = [{"x": x} for x in (3, 1, 2)]
    run = run_shards(work(executor_fns.square_plus, 10, specs), settings)
    assert [r["value"] for r in run.results] == [19, 11, 14]
    assert (run.how["reused"], run.how["resubmitted"]) == (0, 0)
    assert run_shards(work(executor_fns.square_plus, 10, specs), ExecutorSettings()).results == run.results  # local
    again = run_shards(work(executor_fns.square_plus, 999, specs), settings)  # the same key: nothing runs
    assert again.how["reused"] == 3 and again.results == run.results
    other = run_shards(work(executor_fns.square_plus, 999, specs, fingerprint="e" * 64), settings)
    assert other.how["reused"] == 0 and [r["value"] for r in other.results] == [1008, 1000, 1003]


def test_a_shard_that_raises_is_resubmitted(settings, tmp_path, caplog):
    specs = [{"x": 0, "fails": 0}, {"x": 1, "fails": 1}]
    run = run_shards(work(executor_fns.fails_first, str(tmp_path), specs), settings)
    assert [r["attempts"] for r in run.results] == [1, 2] and run.how["resubmitted"] == 1
    assert "test@0: shard 2 of 2 (x 1, fails 1) failed (RuntimeError: attempt 1 of shard x=1 breaks)" in caplog.text


def test_a_shard_that_keeps_raising_is_one_line_with_its_log(settings, tmp_path):
    specs = [{"x": 0, "fails": 0}, {"x": 1, "fails": 5}]
    with pytest.raises(UserError) as info:
        run_shards(work(executor_fns.fails_first, str(tmp_path), specs), settings)
    message = str(info.value)
    assert message.startswith("test@0: shard 2 of 2 (x 1, fails 5) failed 2 times "
                              "(RuntimeError: attempt 2 of shard x=1 breaks); its log: ")
    log = message.split("its log: ")[1]
    assert "\n" not in message and "attempt 2 of shard x=1 breaks" in open(log).read()


def test_a_user_error_in_a_shard_is_not_retried(settings):
    with pytest.raises(UserError, match=r"^test@0: shard 2 of 3 \(x 1\) failed \(params.yaml: batch_size is too "
                                        r"large for this shard, one line\); its log: "):
        run_shards(work(executor_fns.refuses, None, [{"x": 0}, {"x": 1}, {"x": 2}]), settings)


def test_submitits_slurm_executor_runs_the_shards_as_one_job_array(tmp_path, monkeypatch):
    """Through the stand-in SLURM commands (tests/fake_slurm.py)."""
    from tests.fake_slurm import install

    for name, value in install(tmp_path / "bin", tmp_path / "slurm").items():
        monkeypatch.setenv(name, value)
    slurm = ExecutorSettings(executor="submitit", cluster="slurm", retries=1, folder=tmp_path / "executor",
                             submitit_params={"slurm_partition": "gpu"})
    run = run_shards(work(executor_fns.square_plus, 1, [{"x": x} for x in (2, 5)]), slurm)
    assert [r["value"] for r in run.results] == [5, 26]
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir() if p.name != "counter") == ["1000_0", "1000_1"]


def test_a_refused_submission_is_one_line(tmp_path, monkeypatch):
    from tests.fake_slurm import install

    for name, value in install(tmp_path / "bin", tmp_path / "slurm").items():
        monkeypatch.setenv(name, value)
    slurm = ExecutorSettings(executor="submitit", cluster="slurm", folder=tmp_path / "executor",
                             submitit_params={"slurm_partition": "nosuch"})
    with pytest.raises(UserError, match=r"^test@0: submitting 2 shards to submitit's slurm cluster failed: "
                                        r"sbatch: error: invalid partition specified: nosuch$"):
        run_shards(work(executor_fns.square_plus, 1, [{"x": x} for x in (2, 5)]), slurm)
