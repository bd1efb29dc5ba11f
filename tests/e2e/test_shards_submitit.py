"""The sharded stages through submitit's `local` cluster (real subprocesses, as a SLURM job array's tasks
would be), on a small toy study in a fresh project copy:

- the whole study with PIPELINE_EXECUTOR=submitit PIPELINE_SUBMITIT_CLUSTER=local PIPELINE_SHARDS=3 writes
  the same bytes as with the local executor, and changing the executor leaves DVC nothing to do;
- a shard killed once is resubmitted and the result is unchanged;
- a shard that always fails ends the stage with one line naming the shard and its log, writing nothing;
- a stage interrupted while a shard runs reuses the shards that finished when it runs again.

Faults are real: the test kills (or stops) the job's worker process, found from submitit's job folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import GIT_ENV, ROOT, make_project_copy, run_dvc

pytestmark = pytest.mark.slow

PARAMS = {"preset": "toy", "layers": [0, 11], "max_passages": 8, "max_len": 32, "features_per_layer": 3,
          "control_draws": 2, "toy_lm_steps": 0, "toy_sae_steps": 0, "generate_tokens": 4,
          "generate_prompts": ["The"], "screen_top_k": 2, "screen_random": 4}
# 6 shards: intervene's 2 layers x 3 features cut into one feature per shard (generate and screen: one layer each)
SUBMITIT = {"PIPELINE_EXECUTOR": "submitit", "PIPELINE_SUBMITIT_CLUSTER": "local", "PIPELINE_SHARDS": "6"}
LAYER_OUTPUTS = ["metrics/layers/layer_0.csv", "data/detail/layer_0.json", "metrics/layers/layer_11.csv",
                 "data/detail/layer_11.json"]
# the run records (wall time, date, host) and the report's section that shows them differ run to run
VARYING = ("data/runs/", "report/generated/run.md", "report/report.html")


def _without_executor_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}


def outputs(project: Path) -> dict[str, str]:
    """sha256 of every output dvc.lock records, but the VARYING ones."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    paths = {o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    files = []
    for path in sorted(paths):
        full = project / path
        files += sorted(p for p in full.rglob("*") if p.is_file()) if full.is_dir() else [full]
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files if not str(f.relative_to(project)).startswith(VARYING)}


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A project copy whose params are the small toy study, run once with the local executor."""
    project = make_project_copy(tmp_path_factory.mktemp("sharded"))
    params = yaml.safe_load((project / "params.yaml").read_text()) | PARAMS
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "small toy study"], cwd=project, check=True, env={**os.environ, **GIT_ENV})
    started = time.perf_counter()
    result = run_dvc(["repro"], project, env=_without_executor_env())
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nlocal executor: dvc repro {time.perf_counter() - started:.0f} s")
    return project, outputs(project)


def stage(project: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m pipeline intervene` as DVC would start it, with the executor's variables."""
    full = {**_without_executor_env(), **GIT_ENV, "PYTHONPATH": str(project), **env}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "intervene"], cwd=project,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class ShardSaboteur(threading.Thread):
    """Sends `sig` to the worker of every job that runs the shard `spec`, up to `times` times.

    A job's folder is named by its job id and holds its submitted pickle, whose arguments are
    run_shard(fn, inputs, spec, path). The worker is the `submitit.core._submit` process under the job's
    root process: on submitit's local cluster the controller, whose pid is the job id; under the SLURM
    stand-in (tests/fake_slurm.py) the task's process, whose pid its state file holds."""

    def __init__(self, jobs_dir: Path, spec: dict, sig: int, times: int, slurm_state: Path | None = None):
        super().__init__(daemon=True)
        self.jobs_dir, self.spec, self.sig, self.times = jobs_dir, spec, sig, times
        self.slurm_state = slurm_state
        self.hit: list[int] = []  # worker pids signalled
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def spec_of(self, job: Path) -> dict | None:
        import cloudpickle

        pickle_path = job / f"{job.name}_submitted.pkl"
        if not pickle_path.exists():
            return None
        with open(pickle_path, "rb") as f:
            return cloudpickle.load(f).args[2]

    def run(self) -> None:
        while not self.stop.is_set() and len(self.hit) < self.times:
            for job in sorted(self.jobs_dir.glob("[0-9]*")) if self.jobs_dir.is_dir() else []:
                if job.name in self.seen:
                    continue
                spec = self.spec_of(job)
                if spec is None:
                    continue
                self.seen.add(job.name)
                if spec != self.spec:
                    continue
                worker = self.worker_of(job.name)
                if worker is not None:
                    worker.send_signal(self.sig)
                    self.hit.append(worker.pid)
            time.sleep(0.05)

    def worker_of(self, job_id: str) -> psutil.Process | None:
        for _ in range(400):
            try:
                root = int(job_id) if self.slurm_state is None else int(
                    (self.slurm_state / job_id).read_text().split()[1])
                workers = [p for p in psutil.Process(root).children(recursive=True)
                           if p.cmdline()[1:4] == ["-u", "-m", "submitit.core._submit"]]
            except (psutil.NoSuchProcess, FileNotFoundError):
                return None
            if workers:
                return workers[0]
            time.sleep(0.05)
        return None


def test_changing_the_executor_leaves_dvc_nothing_to_do(study):
    project, _ = study
    env = {**_without_executor_env(), **SUBMITIT}
    status = run_dvc(["status", "--json"], project, env=env)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    again = run_dvc(["repro"], project, env=env)
    assert again.returncode == 0 and ran_stages(again) == [], again.stdout


def test_the_sharded_study_writes_the_local_executors_bytes(study, tmp_path):
    project, local = study
    env = {**_without_executor_env(), **SUBMITIT, "PIPELINE_EXECUTOR_DIR": str(tmp_path / "executor")}
    started = time.perf_counter()
    result = run_dvc(["repro", "--force"], project, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nsubmitit local cluster, 3 shards: dvc repro --force {time.perf_counter() - started:.0f} s")
    assert outputs(project) == local
    record = json.loads((project / "data/runs/intervene.json").read_text())
    assert record["executor"]["cluster"] == "local" and record["executor"]["n_shards"] == 6
    assert json.loads((project / "data/runs/generate.json").read_text())["executor"]["n_shards"] == 2  # 2 layers
    assert len(list((tmp_path / "executor/store/intervene").glob("*.pkl"))) == 6
    status = run_dvc(["status", "--json"], project, env=_without_executor_env())
    assert json.loads(status.stdout) == {}, status.stdout


def test_a_shard_killed_once_is_resubmitted_and_changes_nothing(study, tmp_path):
    project, local = study
    folder = tmp_path / "executor"
    saboteur = ShardSaboteur(folder / "jobs/intervene", {"layers": [0], "features": [1]}, signal.SIGKILL, times=1)
    saboteur.start()
    proc = stage(project, {**SUBMITIT, "PIPELINE_EXECUTOR_DIR": str(folder), "PIPELINE_SHARD_RETRIES": "1"})
    out, err = proc.communicate(timeout=900)
    saboteur.stop.set()
    assert proc.returncode == 0, out + err
    assert len(saboteur.hit) == 1
    assert "intervene: shard 2 of 6 (layers [0], features [1]) failed (it ended without a result" in err
    assert "resubmitting it (retry 1 of 1)" in err
    record = json.loads((project / "data/runs/intervene.json").read_text())["executor"]
    assert record["resubmitted"] == 1 and record["reused"] == 0
    assert {k: v for k, v in outputs(project).items() if k in LAYER_OUTPUTS} == {k: local[k] for k in LAYER_OUTPUTS}


def test_a_shard_that_always_fails_ends_the_stage_in_one_line_and_writes_nothing(study, tmp_path):
    project, _ = study
    for path in LAYER_OUTPUTS:
        (project / path).unlink()
    folder = tmp_path / "executor"
    saboteur = ShardSaboteur(folder / "jobs/intervene", {"layers": [0], "features": [2]}, signal.SIGKILL, times=2)
    saboteur.start()
    proc = stage(project, {**SUBMITIT, "PIPELINE_EXECUTOR_DIR": str(folder), "PIPELINE_SHARD_RETRIES": "1"})
    out, err = proc.communicate(timeout=900)
    saboteur.stop.set()
    assert proc.returncode == 2, out + err
    assert len(saboteur.hit) == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: intervene: shard 3 of 6 (layers [0], features [2]) failed 2 times "
                                "(it ended without a result"), errors[0]
    log = Path(errors[0].split("its log: ")[1])
    assert log.is_file() and log.is_relative_to(folder / "jobs/intervene")
    assert not any((project / path).exists() for path in LAYER_OUTPUTS)
    # the other shards were cancelled or had finished: none of the stage's jobs is left running
    controllers = [int(job.name) for job in (folder / "jobs/intervene").glob("[0-9]*")]
    time.sleep(3)
    assert not [pid for pid in controllers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_an_interrupted_stage_reuses_its_finished_shards(study, tmp_path):
    project, local = study
    for path in LAYER_OUTPUTS:
        (project / path).unlink(missing_ok=True)
    folder = tmp_path / "executor"
    env = {**SUBMITIT, "PIPELINE_EXECUTOR_DIR": str(folder)}
    # shard 1 of 6 is held (stopped) so it cannot finish before the interrupt; the others do
    holder = ShardSaboteur(folder / "jobs/intervene", {"layers": [0], "features": [0]}, signal.SIGSTOP, times=1)
    holder.start()
    proc = stage(project, env)
    store = folder / "store/intervene"
    deadline = time.monotonic() + 900
    while len(list(store.glob("*.pkl"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(list(store.glob("*.pkl"))) == 5 and len(holder.hit) == 1
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and not any((project / path).exists() for path in LAYER_OUTPUTS)
    time.sleep(3)
    assert not psutil.pid_exists(holder.hit[0]) or psutil.Process(holder.hit[0]).status() == "zombie"

    again = stage(project, env)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, out + err
    record = json.loads((project / "data/runs/intervene.json").read_text())["executor"]
    assert (record["reused"], record["resubmitted"]) == (5, 0)
    assert "intervene: 5 of 6 shards reused" in err
    assert {k: v for k, v in outputs(project).items() if k in LAYER_OUTPUTS} == {k: local[k] for k in LAYER_OUTPUTS}


def test_the_repo_ignores_the_executor_folder():
    for ignore in (".gitignore", ".dvcignore"):
        assert "/.executor/" in (ROOT / ignore).read_text().splitlines(), ignore


def test_the_slurm_path_with_stand_in_commands(study, tmp_path):
    """SLURM's executor of submitit, driven through tests/fake_slurm.py: one job array, a task killed once is
    seen as failed through sacct and resubmitted, and the bytes are the local executor's."""
    from tests.fake_slurm import install

    project, local = study
    for path in LAYER_OUTPUTS:
        (project / path).unlink(missing_ok=True)
    slurm = install(tmp_path / "bin", tmp_path / "slurm")
    folder = tmp_path / "executor"
    saboteur = ShardSaboteur(folder / "jobs/intervene", {"layers": [0], "features": [0]}, signal.SIGKILL, times=1,
                             slurm_state=tmp_path / "slurm")
    saboteur.start()
    params = json.dumps({"slurm_partition": "gpu", "timeout_min": 30})
    proc = stage(project, {**SUBMITIT, **slurm, "PIPELINE_SUBMITIT_CLUSTER": "slurm", "PIPELINE_EXECUTOR_DIR": str(folder),
                           "PIPELINE_SUBMITIT_PARAMS": params})
    out, err = proc.communicate(timeout=900)
    saboteur.stop.set()
    assert proc.returncode == 0, out + err
    assert len(saboteur.hit) == 1
    assert "failed (it ended without a result (state FAILED)); resubmitting it (retry 1 of 2)" in err, err
    script = next((folder / "jobs/intervene").glob("*/1000_submission.sh")).read_text()
    assert "#SBATCH --array=0-5%6" in script and "#SBATCH --partition=gpu" in script and "#SBATCH --time=30" in script
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir() if p.name != "counter") == [
        *(f"1000_{i}" for i in range(6)), "1001"]  # the array, then the resubmitted shard alone
    assert {k: v for k, v in outputs(project).items() if k in LAYER_OUTPUTS} == {k: local[k] for k in LAYER_OUTPUTS}
