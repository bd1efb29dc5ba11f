"""Where a heavy stage's work runs: in the stage's process, or as shards on a cluster through submitit.

A stage cuts its work into shards, each a pure function of the stage's inputs and the shard's spec
(e.g. a block of features), and merges their results in a fixed order into its usual outputs, so a
sharded run writes the same bytes as an unsharded one. This package knows nothing of any stage: the
stage hands it a `ShardWork` and gets the results back in the specs' order (`run_shards`).

How the shards run is chosen by environment variables, never by params.yaml (settings.py): it changes
nothing they compute, so DVC never reruns a stage for it. With submitit, each finished shard is
stored under a key of everything it depends on (fingerprint.py, store.py), so a stage rerun after an
interruption or a failure submits only the shards still missing (submitit_run.py). docs/cluster.md
tells how to run the study on a SLURM cluster.
"""

from pipeline.executor.fingerprint import stage_fingerprint
from pipeline.executor.run import ShardRun, ShardWork, run_shards, split_evenly
from pipeline.executor.settings import ExecutorSettings, settings_from_env

__all__ = ["ExecutorSettings", "ShardRun", "ShardWork", "run_shards", "settings_from_env", "split_evenly",
           "stage_fingerprint"]
