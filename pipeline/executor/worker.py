"""What a submitit job runs: one shard, its result saved to the store by the job itself.

The job writes the result where the stage will look for it (the executor folder, on a filesystem the
nodes share), so submitit's own result file only carries a short note. A `UserError` (a problem
retrying cannot fix, e.g. out of memory even at batch size 1) comes back as a note, not an exception,
so the stage stops at once with its one line instead of resubmitting the shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.executor.store import save_result


def run_shard(fn: Callable[[Any, Any], Any], inputs: Any, spec: Any, result_path: str) -> dict[str, str]:
    """fn(inputs, spec), saved at result_path; returns {"stored": path} or {"user_error": message}."""
    from pipeline.core.quiet import quiet_library_warnings

    quiet_library_warnings()  # as the command line does: the job's log is for the job
    print(f"shard {spec}: result to {result_path}", flush=True)  # the log says which shard it is
    try:
        result = fn(inputs, spec)
    except UserError as exc:
        return {"user_error": str(exc)}
    save_result(Path(result_path), result)
    return {"stored": result_path}
