"""How the heavy stages run, read from the environment: never from params.yaml.

Where and how a stage's shards run changes nothing they compute (pipeline/executor/__init__.py), so
it is not a param: DVC never sees it and never reruns a stage because it changed. The variables:

- `PIPELINE_EXECUTOR`: `local` (the default: every shard in the stage's own process, one after the
  other) or `submitit` (one job array through submitit).
- `PIPELINE_SUBMITIT_CLUSTER`: `slurm` (the default), `local` (one subprocess per shard on this
  machine) or `debug` (in this process, through submitit; a failing shard opens pdb).
- `PIPELINE_SHARDS`: how many shards a stage splits into (>= 1; default 1; a stage never makes more
  shards than it has units of work).
- `PIPELINE_SHARD_RETRIES`: how often a failed shard is resubmitted (>= 0; default 2).
- `PIPELINE_EXECUTOR_DIR`: the executor's folder: finished shards (`store/`) and job files and logs
  (`jobs/`); default `.executor` under the repository. On SLURM it must be on a filesystem every node
  shares.
- `PIPELINE_SUBMITIT_PARAMS`: submitit's own parameters, exactly as `AutoExecutor.update_parameters`
  takes them, as one JSON object or the path of a JSON file, e.g.
  `{"slurm_partition": "gpu", "timeout_min": 120, "gpus_per_node": 1,
  "slurm_additional_parameters": {"account": "myproject"}}`. submitit checks the names itself.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError

EXECUTORS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_DIR = Path(".executor")
DEFAULT_RETRIES = 2
# submitit's own defaults are a 2-minute (local) or 5-minute (SLURM) time limit: far too short for a stage.
DEFAULT_SUBMITIT_PARAMS: dict[str, Any] = {"timeout_min": 60}

ENV_EXECUTOR = "PIPELINE_EXECUTOR"
ENV_CLUSTER = "PIPELINE_SUBMITIT_CLUSTER"
ENV_SHARDS = "PIPELINE_SHARDS"
ENV_RETRIES = "PIPELINE_SHARD_RETRIES"
ENV_DIR = "PIPELINE_EXECUTOR_DIR"
ENV_PARAMS = "PIPELINE_SUBMITIT_PARAMS"
KNOWN = (ENV_EXECUTOR, ENV_CLUSTER, ENV_SHARDS, ENV_RETRIES, ENV_DIR, ENV_PARAMS)
SUBMITIT_ONLY = (ENV_CLUSTER, ENV_PARAMS)


@dataclass(frozen=True)
class ExecutorSettings:
    """Where a stage's shards run; `ExecutorSettings()` is the default, in-process run."""

    executor: str = "local"
    cluster: str = "slurm"
    shards: int = 1
    retries: int = DEFAULT_RETRIES
    folder: Path = DEFAULT_DIR
    submitit_params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the stage's run record says about how it ran."""
        out: dict[str, Any] = {"executor": self.executor, "shards": self.shards}
        if self.executor == "submitit":
            out |= {"cluster": self.cluster, "retries": self.retries, "folder": str(self.folder),
                    "submitit_params": dict(self.submitit_params)}
        return out


def _count(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(f"{name} is '{text}'; allowed: a whole number >= {minimum}")
    return value


def _choice(name: str, text: str, allowed: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in allowed:
        raise UserError(f"{name} is '{text}'; allowed: {', '.join(allowed)}")
    return value


def _submitit_params(text: str) -> dict[str, Any]:
    """A JSON object, inline (starting with '{') or in a file."""
    source = f"{ENV_PARAMS}"
    if not text.lstrip().startswith("{"):
        path = Path(text.strip())
        if not path.is_file():
            raise UserError(f"{ENV_PARAMS} is '{text}': neither a JSON object nor an existing JSON file")
        source, text = f"{ENV_PARAMS} file {path}", path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise UserError(f"{source} must be one JSON object of submitit parameters, e.g. "
                        '{"slurm_partition": "gpu", "timeout_min": 120}')
    return value


def _check_names(env: Mapping[str, str]) -> None:
    """A misspelt variable would be silently ignored: refuse it, naming the one meant."""
    for name in env:
        if name.startswith(("PIPELINE_SUBMITIT", "PIPELINE_SHARD", "PIPELINE_EXECUTOR")) and name not in KNOWN:
            close = difflib.get_close_matches(name, KNOWN, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown environment variable {name}{hint}; the executor reads {', '.join(KNOWN)}")


def settings_from_env(env: Mapping[str, str] | None = None) -> ExecutorSettings:
    """The settings the environment asks for; each bad value is one line naming the variable."""
    env = os.environ if env is None else env
    _check_names(env)
    executor = _choice(ENV_EXECUTOR, env.get(ENV_EXECUTOR) or "local", EXECUTORS)
    if executor == "local":
        stray = [name for name in SUBMITIT_ONLY if env.get(name)]
        if stray:  # most likely PIPELINE_EXECUTOR was forgotten: do not run the stage here unasked
            raise UserError(f"{stray[0]} is set but {ENV_EXECUTOR} is local; set {ENV_EXECUTOR}=submitit "
                            f"or unset {stray[0]}")
    return ExecutorSettings(
        executor=executor,
        cluster=_choice(ENV_CLUSTER, env.get(ENV_CLUSTER) or "slurm", CLUSTERS),
        shards=_count(ENV_SHARDS, env[ENV_SHARDS], 1) if env.get(ENV_SHARDS) else 1,
        retries=_count(ENV_RETRIES, env[ENV_RETRIES], 0) if env.get(ENV_RETRIES) else DEFAULT_RETRIES,
        folder=Path(env.get(ENV_DIR) or DEFAULT_DIR),
        submitit_params=_submitit_params(env[ENV_PARAMS]) if env.get(ENV_PARAMS) else {},
    )
