"""The shards that are not in the store yet, as one submitit job array; the stage waits for them.

- One `map_array` call submits them (on SLURM one job array; submitit's `local` cluster starts one
  subprocess per shard, `debug` runs them in this process).
- A progress bar counts shards done (reused ones included).
- A shard that fails (an exception, killed, out of memory, out of time, a lost node) is resubmitted
  up to `retries` times. One that still fails ends the stage with one line naming the shard and its
  log, after the stage's other jobs are cancelled; the stage then writes nothing. A `UserError`
  inside a shard is not retried (pipeline/executor/worker.py).
- Ctrl-C or SIGTERM cancels the stage's jobs too. Every shard that finished is in the store either
  way, so the next run submits only the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.executor.settings import DEFAULT_SUBMITIT_PARAMS, ENV_CLUSTER, ENV_PARAMS, ExecutorSettings
from pipeline.executor.store import ShardStore, safe_name
from pipeline.executor.worker import run_shard

log = logging.getLogger(__name__)

POLL_S = {"slurm": 5.0, "local": 0.5, "debug": 0.0}
STORE_WAIT_S = 60  # a result written on another node can take a while to show on a network filesystem


@dataclass(frozen=True)
class Failure:
    """Why one attempt of a shard did not give a result."""

    reason: str
    retry: bool = True  # False: the same inputs would fail again (a UserError)


def make_executor(settings: ExecutorSettings, stage: str):
    """submitit's AutoExecutor for the cluster, its job files and logs under <folder>/jobs/<stage>/<job id>/."""
    import submitit

    folder = Path(settings.folder).resolve() / "jobs" / safe_name(stage) / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=settings.cluster)
    except RuntimeError as exc:  # SLURM asked for where there is none
        raise UserError(f"{ENV_CLUSTER} is {settings.cluster} but submitit cannot use it here ({exc}); run the "
                        f"stage where SLURM's commands are, or set {ENV_CLUSTER}=local") from None
    params = {"name": f"pipeline-{safe_name(stage).replace('@', '-')}", **DEFAULT_SUBMITIT_PARAMS,
              **settings.submitit_params}
    try:
        executor.update_parameters(**params)
    except (NameError, ValueError, TypeError, AssertionError) as exc:  # submitit's own checks
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"{ENV_PARAMS} is refused by submitit's AutoExecutor: {first}") from None
    return executor


def _poll(job) -> tuple[bool, BaseException | None]:
    """Whether the job has ended; the debug cluster runs the shard inside done() and may raise there."""
    try:
        return bool(job.done()), None
    except Exception as exc:  # noqa: BLE001 - any exception of the shard is its failure
        return True, exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    return lines[-1] if lines else text.strip()


def _failure(job, cluster: str, raised: BaseException | None, result_path: Path) -> Failure | None:
    """None when the attempt stored its result; else what went wrong, in a few words."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if raised is not None:
        return Failure(f"{type(raised).__name__}: {raised}")
    if cluster == "local" and not job.paths.result_pickle.exists():
        # locally a job has ended when its process has, and a finished one has written its result by then
        return Failure("it ended without a result (killed, out of memory or out of time)")
    exc = job.exception()
    if isinstance(exc, FailedJobError):
        return Failure(_last_line(str(exc).split("with trace:", 1)[-1].split("You can check full logs")[0]))
    if isinstance(exc, UncompletedJobError):
        return Failure(f"it ended without a result (state {job.state})")
    if exc is not None:
        return Failure(f"{type(exc).__name__}: {exc}")
    note = job.result()
    if "user_error" in note:
        return Failure(note["user_error"], retry=False)
    waited = 0.0
    while not result_path.is_file() and waited < STORE_WAIT_S:
        time.sleep(1.0)
        waited += 1.0
    if not result_path.is_file():
        return Failure(f"it finished but its result is not at {result_path}: is the executor folder on a "
                       "filesystem every node shares?")
    return None


def _kill_local(job) -> None:
    """End a job of submitit's local cluster: its worker, then its controller (job id = the controller's pid).
    submitit's own cancel sends the controller SIGINT, whose traceback lands on the stage's stderr, and the
    worker ignores SIGTERM (submitit keeps it for SLURM's preemption), so both are killed outright."""
    import psutil  # a dependency of DVC, pinned in requirements.txt

    try:
        controller = psutil.Process(int(job.job_id))
        for process in [*controller.children(recursive=True), controller]:
            process.kill()
    except (psutil.NoSuchProcess, ValueError):
        pass


def _cancel(jobs: dict[int, Any], cluster: str) -> None:
    for job in jobs.values():
        try:
            _kill_local(job) if cluster == "local" else job.cancel(check=False)
        except Exception as exc:  # noqa: BLE001 - cancelling is best effort: the stage is ending anyway
            log.warning("could not cancel job %s: %s", getattr(job, "job_id", "?"), exc)


def log_path(job) -> Path:
    return job.paths.stderr


def run_missing(fn: Callable[[Any, Any], Any], inputs: Any, specs: Sequence[Any], todo: list[int], keys: list[str],
                store: ShardStore, stage: str, settings: ExecutorSettings, describe: Callable[[int], str],
                done_before: int) -> int:
    """Run the shards `todo` (indices into specs) until each is in the store; returns how many attempts
    were resubmissions."""
    executor = make_executor(settings, stage)
    attempts = dict.fromkeys(todo, 0)
    running: dict[int, Any] = {}

    def submit(indices: list[int]) -> None:
        paths = [str(store.path(keys[i]).resolve()) for i in indices]
        n = len(indices)
        try:
            jobs = executor.map_array(run_shard, [fn] * n, [inputs] * n, [specs[i] for i in indices], paths)
        except (OSError, RuntimeError) as exc:  # e.g. sbatch refusing the array (submitit raises its stderr)
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UserError(f"{stage}: submitting {n} shard{'s' if n > 1 else ''} to submitit's {settings.cluster} "
                            f"cluster failed: {first}") from None
        for i, job in zip(indices, jobs, strict=True):
            running[i] = job
            attempts[i] += 1

    store.dir.mkdir(parents=True, exist_ok=True)
    submit(todo)
    first = running[todo[0]]
    log.info("%s: submitted %d shard%s to submitit's %s cluster; logs under %s", stage, len(todo),
             "" if len(todo) == 1 else "s", settings.cluster, Path(first.paths.folder).parent)
    with tqdm(total=len(specs), initial=done_before, desc=f"{stage} shards", unit="shard", disable=None,
              leave=False) as bar:
        try:
            while running:
                time.sleep(POLL_S[settings.cluster])
                again = []
                for i, job in list(running.items()):
                    ended, raised = _poll(job)
                    if not ended:
                        continue
                    del running[i]
                    failure = _failure(job, settings.cluster, raised, store.path(keys[i]))
                    if failure is None:
                        bar.update(1)
                        continue
                    where = f"its log: {log_path(job)}"
                    if not failure.retry or attempts[i] > settings.retries:
                        tries = "" if not failure.retry else f" {attempts[i]} time{'s' if attempts[i] > 1 else ''}"
                        raise UserError(f"{stage}: {describe(i)} failed{tries} ({failure.reason}); {where}")
                    log.warning("%s: %s failed (%s); resubmitting it (retry %d of %d); %s", stage, describe(i),
                                failure.reason, attempts[i], settings.retries, where)
                    again.append(i)
                if again:
                    submit(again)
        except BaseException:
            _cancel(running, settings.cluster)
            raise
    return sum(attempts.values()) - len(todo)
