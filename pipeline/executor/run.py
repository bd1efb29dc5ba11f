"""run_shards: a stage's shards, run where the settings say, their results in the specs' order."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.executor.fingerprint import shard_key
from pipeline.executor.settings import ExecutorSettings, settings_from_env
from pipeline.executor.store import ShardStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardWork:
    """A stage's work, cut into shards.

    `fn(inputs, spec)` computes one shard: a pure function of the stage's inputs and the shard's spec,
    defined at a module's top level so a job can import it (submitit pickles it by reference).
    `inputs` is what every shard needs (picklable: e.g. the params); a `spec` is small and JSON-able
    (e.g. `{"layers": [3], "features": [0, 1]}`) and says which part of the work the shard is.
    `fingerprint` (pipeline.executor.fingerprint.stage_fingerprint) covers every input, param and line
    of code the results depend on; with each spec it makes the key finished shards are stored under."""

    stage: str  # e.g. "intervene": messages, the store's and the logs' folders, the job name
    fn: Callable[[Any, Any], Any]
    inputs: Any
    specs: Sequence[Any]
    fingerprint: str = ""  # only the submitit executor stores shards, and needs it


@dataclass
class ShardRun:
    """The shards' results (in the specs' order) and how they were obtained, for the run record."""

    results: list[Any]
    how: dict[str, Any] = field(default_factory=dict)


def split_evenly(n_items: int, n_shards: int) -> list[range]:
    """0..n_items-1 in min(n_shards, n_items) contiguous blocks whose sizes differ by at most one (the larger first)."""
    n_shards = max(1, min(n_shards, n_items))
    size, extra = divmod(n_items, n_shards)
    blocks, start = [], 0
    for s in range(n_shards):
        stop = start + size + (1 if s < extra else 0)
        blocks.append(range(start, stop))
        start = stop
    return blocks


def _describe(spec: Any, i: int, n: int) -> str:
    if isinstance(spec, dict):
        inner = ", ".join(f"{k} {v}" for k, v in spec.items())
        return f"shard {i + 1} of {n} ({inner})"
    return f"shard {i + 1} of {n} ({spec})"


def run_shards(work: ShardWork, settings: ExecutorSettings | None = None) -> ShardRun:
    """Every shard's result, in the order of `work.specs`.

    local: each shard in this process, one after the other (no store: as a stage always ran).
    submitit: shards already in the store are reused, the others go out as one job array."""
    settings = settings_from_env() if settings is None else settings
    specs = list(work.specs)
    if settings.executor == "local":
        return ShardRun([work.fn(work.inputs, spec) for spec in specs], settings.describe() | {"n_shards": len(specs)})

    from pipeline.executor.submitit_run import run_missing

    if not work.fingerprint:
        raise ValueError(f"{work.stage}: the submitit executor stores shards by key and needs a fingerprint")
    store = ShardStore(settings.folder, work.stage)
    keys = [shard_key(work.fingerprint, spec) for spec in specs]
    todo = [i for i, key in enumerate(keys) if not store.has(key)]
    reused = len(specs) - len(todo)
    if reused:
        log.info("%s: %d of %d shards reused from %s", work.stage, reused, len(specs), store.dir)
    resubmitted = 0
    if todo:
        resubmitted = run_missing(work.fn, work.inputs, specs, todo, keys, store, work.stage, settings,
                                  lambda i: _describe(specs[i], i, len(specs)), reused)
    results = [store.load(key) for key in keys]
    return ShardRun(results, settings.describe() | {"n_shards": len(specs), "reused": reused,
                                                    "resubmitted": resubmitted, "keys": keys})
